"""KServe v2 over HTTP/REST (FastAPI + uvicorn) as Triton serves it: health, metadata, config, repository
index, statistics, `infer` with the binary tensor data extension (what `tritonclient.http` sends), and the
`generate` / `generate_stream` (Server-Sent Events) extension; plus the Prometheus metrics endpoint."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from trtllm_bdlora import __version__
from trtllm_bdlora.errors import BdLoraError, BodyTooLargeError, InputError, RequestError, ServerBusyError, UnimplementedError
from trtllm_bdlora.serving.edge.asgi import cancel_on_disconnect
from trtllm_bdlora.serving.edge.payload import parse_json
from trtllm_bdlora.serving.kserve.capacity import CALLS_REFUSAL, EXTENSIONS, MAX_MESSAGE_BYTES, CallSlots
from trtllm_bdlora.serving.kserve.tensors import from_http, to_http
from trtllm_bdlora.serving.metrics import Metrics
from trtllm_bdlora.serving.repository.calls import CallContext, InferRequest, ModelResponse, WireTensor, error_status
from trtllm_bdlora.serving.repository.config import triton_json
from trtllm_bdlora.serving.repository.repository import ModelServer

HEADER_LENGTH = "Inference-Header-Content-Length"
DECOUPLED_REFUSAL = "HTTP end point doesn't support models with decoupled transaction policy"  # Triton's words
ONE_RESPONSE = ("generate expects model to produce exactly 1 response, use generate stream for model that generates "
                "various number of responses")  # Triton's words
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def is_health(path: str) -> bool:
    """Triton's health endpoints: server live / ready and model ready (answered without an API key)."""
    return path in HEALTH_PATHS or (path.startswith("/v2/models/") and path.endswith("/ready"))


def error_document(err: BaseException) -> dict:
    return {"error": error_status(err)[2]}


def _error(err: BaseException) -> JSONResponse:
    _, status, message = error_status(err)
    return JSONResponse({"error": message}, status_code=status)


class InferencePool:
    """The threads that run HTTP inference calls, apart from the event loop (health and metadata answer there)
    and bounded: a call beyond `limit` is refused at once with 429."""

    def __init__(self, limit: int):
        self.slots = CallSlots(limit, CALLS_REFUSAL)
        self.executor = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="http-infer")

    async def run(self, fn, *args):
        if not self.slots.acquire():
            raise ServerBusyError(self.slots.refusal())
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.slots.release()


def generate_inputs(server: ModelServer, model: str, doc) -> InferRequest:
    """Triton's generate extension: each JSON field is an input (a scalar is a one-element tensor), batch 1."""
    spec = server.model(model).spec
    if not isinstance(doc, dict):
        raise RequestError("generate request must be a JSON object")
    params = doc.get("parameters") or {}
    wire = {t["name"]: t["datatype"] for t in server.metadata[model]["inputs"]}
    tensors = []
    for name, value in doc.items():
        if name == "parameters":
            continue
        t = spec.input(name)
        if t is None:
            raise RequestError(f"unexpected inference input '{name}' for model '{model}'")
        try:
            if wire[name] == "BYTES":
                array = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(
                    np.array(value, dtype=object))
            else:
                array = _cast(np.array(value), wire[name], name)
        except (ValueError, TypeError, OverflowError):  # ragged or mixed JSON arrays
            raise InputError(name, f"must be a {wire[name]} value or a regular array of them") from None
        while array.ndim < len(t.dims):
            array = array[None]
        array = array[None]
        tensors.append(WireTensor(name, wire[name], list(array.shape), array))
    return InferRequest(model, str(params.get("id", "")), tensors, None, False, params)


def _cast(array: np.ndarray, datatype: str, name: str) -> np.ndarray:
    target = {"BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64, "UINT8": np.uint8,
              "FP16": np.float16, "FP32": np.float32, "BF16": np.float32}[datatype]
    if array.dtype.kind not in "biuf" or (np.dtype(target).kind in "iu" and array.dtype.kind == "f"):
        raise RequestError(f"input {name} must be {datatype}, got {array.dtype.name} values")
    if np.dtype(target).kind in "iu" and array.size and array.dtype.kind in "iu":  # never wrap: -1 is no UINT64
        info = np.iinfo(target)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise InputError(name, f"must be in [{info.min}, {info.max}] ({datatype}), got {low if low < info.min else high}")
    return array.astype(target)


def _json_outputs(outputs: dict[str, np.ndarray]) -> dict:
    doc = {}
    for name, array in outputs.items():
        values = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        doc[name] = values[0] if len(values) == 1 else values
    return doc


def build_app(server: ModelServer, max_inference_calls: int = 272, max_body_bytes: int = MAX_MESSAGE_BYTES) -> FastAPI:
    """Health, metadata, config and statistics run on the event loop (async, never waiting for a thread);
    inference, and reading any JSON document, run on threads (inference on its own bounded pool). A client that
    disconnects before its answer cancels its request."""
    app = FastAPI(title="trtllm-bdlora KServe v2", version=__version__)
    pool = InferencePool(max_inference_calls)

    async def body_of(request: Request) -> bytes:
        return await _body(request, max_body_bytes)

    @app.exception_handler(BdLoraError)
    async def request_error(_request: Request, err: BdLoraError):  # e.g. a body over the limit
        return _error(err)

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        runtime = server.runtime
        return Response(status_code=200 if runtime.healthy and not runtime.stopping.is_set() else 400)

    @app.get("/v2")
    async def metadata():
        return {"name": "trtllm-bdlora", "version": __version__, "extensions": EXTENSIONS}

    @app.post("/v2/repository/index")
    async def index(request: Request):
        doc = await run_in_threadpool(parse_json, await body_of(request) or b"{}")
        only_ready = bool(doc.get("ready", False)) if isinstance(doc, dict) else False
        # as Triton writes the index: a model's `reason` only where there is one
        return [{k: v for k, v in m.items() if k != "reason" or v} for m in server.index()
                if not only_ready or m["state"] == "READY"]

    @app.get("/v2/models/stats")
    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def stats(model: str = "", version: str = ""):
        names = [model] if model else sorted(server.models)
        error = next(filter(None, (unknown(name, version) for name in names)), None)
        if error is not None:
            return error
        out = []
        for name in names:
            s = server.metrics.statistics(name)
            entry = {"name": name, "version": "1", "last_inference": s["last_inference"],
                     "inference_count": s["inference_count"], "execution_count": s["execution_count"],
                     "inference_stats": {k: {"count": s[k][0], "ns": s[k][1]} for k in
                                         ("success", "fail", "queue", "compute_input", "compute_infer",
                                          "compute_output")}}
            out.append(entry)
        return {"model_stats": out}

    def unknown(model: str, version: str) -> JSONResponse | None:
        try:
            server.model(model, version)
        except BdLoraError as err:
            return _error(err)
        return None

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = ""):
        return unknown(model, version) or server.metadata[model]

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = ""):
        return Response(status_code=200 if server.ready(model, version) else 400)

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str = ""):
        return unknown(model, version) or triton_json(server.configs[model])

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str = ""):
        body = await body_of(request)
        header = request.headers.get(HEADER_LENGTH)
        gone = threading.Event()

        def run():
            if server.decoupled(model, version):
                raise UnimplementedError(DECOUPLED_REFUSAL)
            infer_request = from_http(model, body, _header_length(header))
            ctx = CallContext(infer_request.id, decoupled=False, parameters=infer_request.parameters, cancelled=gone)
            responses = [r for r in server.infer(infer_request, ctx, version) if r.outputs] or [ModelResponse({})]
            if len(responses) != 1:
                raise RequestError(f"model '{model}' sent {len(responses)} responses: use generate_stream or gRPC")
            started = time.perf_counter_ns()
            out = to_http(model, infer_request.id, responses[0].outputs, infer_request.binary_outputs,
                          responses[0].parameters)
            server.metrics.output_time(model, time.perf_counter_ns() - started)
            return out

        try:
            async with cancel_on_disconnect(request, gone.set):
                payload, json_size = await pool.run(run)
        except Exception as err:  # noqa: BLE001 - every failure is the client's answer, never the server's end
            return _error(err)
        headers = {HEADER_LENGTH: str(json_size)} if json_size is not None else {}
        media = "application/octet-stream" if json_size is not None else "application/json"
        return Response(payload, media_type=media, headers=headers)

    @app.post("/v2/models/{model}/generate")
    @app.post("/v2/models/{model}/versions/{version}/generate")
    async def generate(model: str, request: Request, version: str = ""):
        body = await body_of(request)
        gone = threading.Event()

        def run():
            infer_request = generate_inputs(server, model, parse_json(body))
            ctx = CallContext(infer_request.id, parameters=infer_request.parameters, cancelled=gone)
            answered = None
            for r in server.infer(infer_request, ctx, version):
                if not r.outputs:
                    continue
                if answered is not None:  # as Triton: the first response's 200 is out; the error follows in the body
                    ctx.cancelled.set()
                    return JSONResponse({"error": ONE_RESPONSE})
                answered = {"model_name": model, "model_version": "1", **r.parameters, **_json_outputs(r.outputs)}
            if answered is None:
                raise RequestError(ONE_RESPONSE)
            return answered

        try:
            async with cancel_on_disconnect(request, gone.set):
                return await pool.run(run)
        except Exception as err:  # noqa: BLE001
            return _error(err)

    @app.post("/v2/models/{model}/generate_stream")
    @app.post("/v2/models/{model}/versions/{version}/generate_stream")
    async def generate_stream(model: str, request: Request, version: str = ""):
        body = await body_of(request)
        try:
            infer_request = await pool.run(lambda: generate_inputs(server, model, parse_json(body)))
        except Exception as err:  # noqa: BLE001
            return _error(err)
        ctx = CallContext(infer_request.id, parameters=infer_request.parameters)

        def events():
            try:
                for r in server.infer(infer_request, ctx, version):
                    if r.outputs:
                        doc = {"model_name": model, "model_version": "1", **r.parameters, **_json_outputs(r.outputs)}
                        yield f"data: {json.dumps(doc)}\n\n"
            except Exception as err:  # noqa: BLE001
                yield f"data: {json.dumps({'error': error_status(err)[2]})}\n\n"
            finally:
                ctx.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def _body(request: Request, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"request body of {declared} bytes is over the {limit}-byte limit (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(f"request body is over the {limit}-byte limit (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _header_length(header: str | None) -> int | None:
    if header is None:
        return None
    try:
        return int(header)
    except ValueError:
        raise RequestError(f"{HEADER_LENGTH} must be an integer, got {header[:40]!r}") from None


def build_metrics_app(metrics: Metrics) -> FastAPI:
    app = FastAPI(title="trtllm-bdlora metrics")

    @app.get("/metrics")
    async def metrics_text():  # on the event loop: a scrape never waits behind streaming responses' threads
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

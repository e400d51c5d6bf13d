"""KServe v2 over HTTP/REST (FastAPI + uvicorn) as Triton serves it: health, metadata, config, repository
index, load and unload, statistics, logging and trace settings, system shared memory, `infer` with the binary tensor
data extension (what `tritonclient.http` sends), and the `generate` / `generate_stream` (Server-Sent Events)
extension; plus the Prometheus metrics endpoint. Every error, an unknown route's included, is Triton's
`{"error": "..."}`."""

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
from starlette.exceptions import HTTPException

from trtllm_bdlora import __version__
from trtllm_bdlora.errors import BdLoraError, BodyTooLargeError, InputError, RequestError, ServerBusyError, UnimplementedError
from trtllm_bdlora.serving.edge.asgi import cancel_on_disconnect
from trtllm_bdlora.serving.edge.payload import parse_json
from trtllm_bdlora.serving.kserve import control
from trtllm_bdlora.serving.kserve.capacity import CALLS_REFUSAL, EXTENSIONS, MAX_MESSAGE_BYTES, CallSlots
from trtllm_bdlora.serving.kserve.shm import SharedMemoryRegions
from trtllm_bdlora.serving.kserve.tensors import from_http, json_object, to_http, within_range
from trtllm_bdlora.serving.metrics import METRICS_CONTENT_TYPE, Metrics
from trtllm_bdlora.serving.repository.calls import CallContext, InferRequest, ModelResponse, WireTensor, error_status
from trtllm_bdlora.serving.repository.config import triton_json
from trtllm_bdlora.serving.repository.repository import ModelServer

HEADER_LENGTH = "Inference-Header-Content-Length"
DECOUPLED_REFUSAL = "HTTP end point doesn't support models with decoupled transaction policy"  # Triton's words
ONE_RESPONSE = ("generate expects model to produce exactly 1 response, use generate stream for model that generates "
                "various number of responses")  # Triton's words
PROTOCOL = "kserve_http"
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def is_health(path: str) -> bool:
    """Triton's health endpoints: server live / ready and model ready (answered without an API key)."""
    return path in HEALTH_PATHS or (path.startswith("/v2/models/") and path.endswith("/ready"))


def error_document(err: BaseException) -> dict:
    return {"error": error_status(err)[2]}


def _error(err: BaseException) -> JSONResponse:
    _, status, message = error_status(err)
    return JSONResponse({"error": message}, status_code=status)


def answer_routing_errors(app: FastAPI) -> None:
    """An unknown route (404) or method (405) in Triton's shape and words: {"error": "Not Found"}."""

    @app.exception_handler(HTTPException)
    async def routing_error(_request: Request, err: HTTPException):
        text = {404: "Not Found", 405: "Method Not Allowed"}.get(err.status_code, str(err.detail))
        return JSONResponse({"error": text}, status_code=err.status_code, headers=err.headers)


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
    params = json_object(doc.get("parameters"), "parameters")
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
    with np.errstate(over="ignore"):
        return within_range(array.astype(target), array, datatype, name)


def _json_outputs(outputs: dict[str, np.ndarray]) -> dict:
    doc = {}
    for name, array in outputs.items():
        values = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        doc[name] = values[0] if len(values) == 1 else values
    return doc


def build_app(server: ModelServer, max_inference_calls: int = 272, max_body_bytes: int = MAX_MESSAGE_BYTES,
              regions: SharedMemoryRegions | None = None) -> FastAPI:
    """Health, metadata, config and statistics run on the event loop (async, never waiting for a thread);
    inference, and reading any JSON document, run on threads (inference on its own bounded pool). A client that
    disconnects before its answer cancels its request. `regions`: the system shared memory (shared with gRPC)."""
    app = FastAPI(title="trtllm-bdlora KServe v2", version=__version__)
    pool = InferencePool(max_inference_calls)
    regions = regions if regions is not None else SharedMemoryRegions()
    answer_routing_errors(app)

    async def body_of(request: Request) -> bytes:
        return await _body(request, max_body_bytes)

    async def document(request: Request, what: str, empty=None):
        """The body as JSON (parsed on a thread), or `empty` when there is no body."""
        body = await body_of(request)
        if not body.strip():
            if empty is None:
                raise RequestError(f"{what} request has no body")
            return empty
        return await run_in_threadpool(parse_json, body)

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
        for name in names:
            server.statistics_model(name, version)
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
            with server.metrics.call(PROTOCOL) as call:
                if server.decoupled(model, version):
                    raise UnimplementedError(DECOUPLED_REFUSAL)
                infer_request = from_http(model, body, _header_length(header), regions)
                ctx = CallContext(infer_request.id, decoupled=False, parameters=infer_request.parameters,
                                  cancelled=gone, call=call)
                responses = [r for r in server.infer(infer_request, ctx, version) if r.outputs] or [ModelResponse({})]
                if len(responses) != 1:
                    raise RequestError(f"model '{model}' sent {len(responses)} responses: use generate_stream or gRPC")
                started = time.perf_counter_ns()
                out = to_http(model, infer_request.id, responses[0].outputs, infer_request.binary_outputs, regions,
                              infer_request.output_regions, parameters=responses[0].parameters)
                server.metrics.output_time(model, time.perf_counter_ns() - started)
                call.finish(ok=True)
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
            with server.metrics.call(PROTOCOL) as call:
                infer_request = generate_inputs(server, model, parse_json(body))
                # decoupled: a decoupled model may answer generate, as in Triton, while it sends one response
                ctx = CallContext(infer_request.id, decoupled=True, parameters=infer_request.parameters,
                                  cancelled=gone, call=call)
                answered = None
                for r in server.infer(infer_request, ctx, version):
                    if not r.outputs:
                        continue
                    if answered is not None:  # as Triton: the first response's 200 is out; the error follows in the body
                        ctx.cancelled.set()
                        call.finish(ok=False)
                        return JSONResponse({"error": ONE_RESPONSE})
                    answered = {"model_name": model, "model_version": "1", **r.parameters, **_json_outputs(r.outputs)}
                if answered is None:
                    raise RequestError(ONE_RESPONSE)
                call.finish(ok=True)
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
        call = server.metrics.call(PROTOCOL)
        try:
            with call:
                infer_request = await pool.run(lambda: generate_inputs(server, model, parse_json(body)))
        except Exception as err:  # noqa: BLE001
            return _error(err)
        ctx = CallContext(infer_request.id, decoupled=True, parameters=infer_request.parameters, call=call)

        def events():
            try:
                for r in server.infer(infer_request, ctx, version):
                    if r.outputs:
                        doc = {"model_name": model, "model_version": "1", **r.parameters, **_json_outputs(r.outputs)}
                        yield f"data: {json.dumps(doc)}\n\n"
                call.finish(ok=True)
            except Exception as err:  # noqa: BLE001
                call.finish(ok=False)
                yield f"data: {json.dumps({'error': error_status(err)[2]})}\n\n"
            finally:
                call.finish(ok=False)  # the client left before the end
                ctx.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    # repository, logging, trace (control.py) --------------------------------------
    @app.post("/v2/repository/models/{model}/load")
    async def load(model: str, request: Request):
        doc = await document(request, "load", {})
        parameters = doc.get("parameters", {}) if isinstance(doc, dict) else None
        if not isinstance(parameters, dict):
            raise RequestError("load request must be a JSON object whose 'parameters' is an object")
        server.load(model, parameters)
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload")
    async def unload(model: str, request: Request):
        doc = await document(request, "unload", {})
        parameters = doc.get("parameters", {}) if isinstance(doc, dict) else None
        if not isinstance(parameters, dict):
            raise RequestError("unload request must be a JSON object whose 'parameters' is an object")
        server.unload(model, control.unload_dependents(parameters))
        return Response(status_code=200)

    @app.get("/v2/logging")
    async def log_settings():
        return control.log_settings()

    @app.post("/v2/logging")
    async def update_log_settings(request: Request):
        doc = await document(request, "logging")
        if not isinstance(doc, dict):
            raise RequestError("logging request must be a JSON object")
        return control.update_log_settings(doc)

    @app.get("/v2/trace/setting")
    @app.get("/v2/models/{model}/trace/setting")
    async def trace_settings(model: str = ""):
        trace_model(model)
        return server.tracer.settings(model)

    @app.post("/v2/trace/setting")
    @app.post("/v2/models/{model}/trace/setting")
    async def update_trace_settings(request: Request, model: str = ""):
        trace_model(model)
        return server.tracer.update(model, control.http_trace_changes(await document(request, "trace", {})))

    def trace_model(model: str) -> None:
        if model and not server.ready(model):
            raise RequestError(f"Request for unknown model : {model}")

    # system shared memory (shm.py) -------------------------------------------------
    @app.get("/v2/systemsharedmemory/status")
    @app.get("/v2/systemsharedmemory/region/{name}/status")
    async def shm_status(name: str = ""):
        return regions.status(name)

    @app.post("/v2/systemsharedmemory/region/{name}/register")
    async def shm_register(name: str, request: Request):
        doc = await document(request, "Shared memory register")
        if not isinstance(doc, dict):
            raise RequestError("Shared memory register request must be a JSON object")
        for key in ("key", "byte_size"):
            if key not in doc:
                raise RequestError(f"Shared memory register request has no '{key}' field")
        if not isinstance(doc["key"], str):
            raise RequestError("Shared memory register request's 'key' must be a string")
        await run_in_threadpool(regions.register, name, doc["key"], doc.get("offset", 0), doc["byte_size"])
        return Response(status_code=200)

    @app.post("/v2/systemsharedmemory/unregister")
    @app.post("/v2/systemsharedmemory/region/{name}/unregister")
    async def shm_unregister(name: str = ""):
        regions.unregister(name)
        return Response(status_code=200)

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
    answer_routing_errors(app)

    @app.get("/metrics")
    async def metrics_text():  # on the event loop: a scrape never waits behind streaming responses' threads
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    return app

"""KServe v2 over HTTP/REST (FastAPI + uvicorn) as Triton serves it: health, metadata, config, repository
index, statistics, `infer` with the binary tensor data extension (what `tritonclient.http` sends), and the
`generate` / `generate_stream` (Server-Sent Events) extension; plus the Prometheus metrics endpoint."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format

from trtllm_bdlora import __version__
from trtllm_bdlora.errors import BdLoraError, BodyTooLargeError, InputError, RequestError, ServerBusyError
from trtllm_bdlora.serving.kserve.capacity import CALLS_REFUSAL, EXTENSIONS, MAX_MESSAGE_BYTES, CallSlots
from trtllm_bdlora.serving.kserve.tensors import from_http, to_http
from trtllm_bdlora.serving.metrics import Metrics
from trtllm_bdlora.serving.repository.calls import CallContext, InferRequest, ModelResponse, WireTensor, error_status
from trtllm_bdlora.serving.repository.repository import ModelServer

HEADER_LENGTH = "Inference-Header-Content-Length"
STOP_GRACE_S = 1  # at shutdown: how long open HTTP connections may take to finish


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
    return array.astype(target)


def _json_outputs(outputs: dict[str, np.ndarray]) -> dict:
    doc = {}
    for name, array in outputs.items():
        values = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        doc[name] = values[0] if len(values) == 1 else values
    return doc


def build_app(server: ModelServer, max_inference_calls: int = 272) -> FastAPI:
    """Health, metadata, config and statistics run on the event loop (async, never waiting for a thread);
    inference runs on its own bounded pool."""
    app = FastAPI(title="trtllm-bdlora KServe v2", version=__version__)
    pool = InferencePool(max_inference_calls)

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
        doc = _json(await _body(request) or b"{}")
        only_ready = bool(doc.get("ready", False)) if isinstance(doc, dict) else False
        return [m for m in server.index() if not only_ready or m["state"] == "READY"]

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
        return unknown(model, version) or json_format.MessageToDict(server.configs[model],
                                                                    preserving_proto_field_name=True)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str = ""):
        body = await _body(request)
        header = request.headers.get(HEADER_LENGTH)

        def run():
            infer_request = from_http(model, body, _header_length(header))
            ctx = CallContext(infer_request.id, decoupled=False, parameters=infer_request.parameters)
            responses = [r for r in server.infer(infer_request, ctx, version) if r.outputs] or [ModelResponse({})]
            if len(responses) != 1:
                raise RequestError(f"model '{model}' sent {len(responses)} responses: use generate_stream or gRPC")
            started = time.perf_counter_ns()
            out = to_http(model, infer_request.id, responses[0].outputs, infer_request.binary_outputs)
            server.metrics.output_time(model, time.perf_counter_ns() - started)
            return out

        try:
            payload, json_size = await pool.run(run)
        except Exception as err:  # noqa: BLE001 - every failure is the client's answer, never the server's end
            return _error(err)
        headers = {HEADER_LENGTH: str(json_size)} if json_size is not None else {}
        media = "application/octet-stream" if json_size is not None else "application/json"
        return Response(payload, media_type=media, headers=headers)

    @app.post("/v2/models/{model}/generate")
    @app.post("/v2/models/{model}/versions/{version}/generate")
    async def generate(model: str, request: Request, version: str = ""):
        body = await _body(request)

        def run():
            infer_request = generate_inputs(server, model, _json(body))
            ctx = CallContext(infer_request.id, decoupled=False, parameters=infer_request.parameters)
            responses = [r for r in server.infer(infer_request, ctx, version) if r.outputs]
            if len(responses) != 1:
                raise RequestError(f"model '{model}' sent {len(responses)} responses: use generate_stream")
            return {"model_name": model, "model_version": "1", **_json_outputs(responses[0].outputs)}

        try:
            return await pool.run(run)
        except Exception as err:  # noqa: BLE001
            return _error(err)

    @app.post("/v2/models/{model}/generate_stream")
    @app.post("/v2/models/{model}/versions/{version}/generate_stream")
    async def generate_stream(model: str, request: Request, version: str = ""):
        body = await _body(request)
        try:
            infer_request = await pool.run(generate_inputs, server, model, _json(body))
        except Exception as err:  # noqa: BLE001
            return _error(err)
        ctx = CallContext(infer_request.id, decoupled=True, parameters=infer_request.parameters)

        def events():
            try:
                for r in server.infer(infer_request, ctx, version):
                    if r.outputs:
                        doc = {"model_name": model, "model_version": "1", **_json_outputs(r.outputs)}
                        yield f"data: {json.dumps(doc)}\n\n"
            except Exception as err:  # noqa: BLE001
                yield f"data: {json.dumps({'error': error_status(err)[2]})}\n\n"
            finally:
                ctx.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_MESSAGE_BYTES:
        raise BodyTooLargeError(f"request body of {declared} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_MESSAGE_BYTES:
            raise BodyTooLargeError(f"request body is over the {MAX_MESSAGE_BYTES}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _header_length(header: str | None) -> int | None:
    if header is None:
        return None
    try:
        return int(header)
    except ValueError:
        raise RequestError(f"{HEADER_LENGTH} must be an integer, got {header[:40]!r}") from None


def _json(body: bytes):
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"request body is not valid JSON: {err}") from None


def build_metrics_app(metrics: Metrics) -> FastAPI:
    app = FastAPI(title="trtllm-bdlora metrics")

    @app.get("/metrics")
    async def metrics_text():  # on the event loop: a scrape never waits behind streaming responses' threads
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class HttpServer:
    """uvicorn on its own thread, on a socket bound up front so a taken port fails `serve` at once."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as err:
            self.sock.close()
            raise BdLoraError(f"cannot listen on {host}:{port} ({err.strerror})") from None
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=STOP_GRACE_S))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> HttpServer:
        self.thread.start()
        return self

    def begin_stop(self) -> None:
        """Stop accepting; open connections get STOP_GRACE_S to finish."""
        self.server.should_exit = True

    def stop(self, timeout: float = STOP_GRACE_S + 2) -> None:
        self.begin_stop()
        self.thread.join(timeout)
        self.sock.close()


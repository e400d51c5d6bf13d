"""KServe v2 gRPC (the service shipped in `tritonclient`) for the five models, as Triton serves TensorRT-LLM's
`inflight_batcher_llm` repository: health, server / model metadata, model config, repository index, load and
unload, statistics, log and trace settings, system shared memory, ModelInfer (one response) and ModelStreamInfer
(decoupled: every response of every request on the stream, `triton_final_response` when the client enables empty
final responses)."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from trtllm_bdlora import __version__
from trtllm_bdlora.errors import BdLoraError, ModelNotFound, UnimplementedError
from trtllm_bdlora.serving.edge.auth import ApiKeyInterceptor, ApiKeys
from trtllm_bdlora.serving.edge.settings import DEFAULT_MAX_CONNECTIONS, EdgeSettings
from trtllm_bdlora.serving.kserve import control
from trtllm_bdlora.serving.kserve.capacity import CALLS_REFUSAL, EXTENSIONS, MAX_MESSAGE_BYTES, STREAMS_REFUSAL, CallSlots, Capacity
from trtllm_bdlora.serving.kserve.shm import SharedMemoryRegions
from trtllm_bdlora.serving.kserve.tensors import from_grpc, grpc_parameters, to_grpc
from trtllm_bdlora.serving.repository.calls import CallContext, error_status
from trtllm_bdlora.serving.repository.repository import ModelServer

EMPTY_FINAL = "triton_enable_empty_final_response"
DECOUPLED_REFUSAL = "ModelInfer RPC doesn't support models with decoupled transaction policy"  # Triton's words
PROTOCOL = "kserve_grpc"


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    code, _, message = error_status(err)
    return getattr(grpc.StatusCode, code), message


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: ModelServer, capacity: Capacity | None = None, regions: SharedMemoryRegions | None = None):
        self.server = server
        self.regions = regions if regions is not None else SharedMemoryRegions()
        capacity = capacity or Capacity()
        self.stream_slots = CallSlots(capacity.streams, STREAMS_REFUSAL)
        self.unary_slots = CallSlots(capacity.unary, CALLS_REFUSAL)

    # health and metadata -----------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        runtime = self.server.runtime
        return pb.ServerReadyResponse(ready=runtime.healthy and not runtime.stopping.is_set())

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.server.ready(request.name, request.version))

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="trtllm-bdlora", version=__version__, extensions=EXTENSIONS)

    def _model(self, name: str, version: str, context):
        try:
            return self.server.model(name, version)
        except ModelNotFound as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))

    def ModelMetadata(self, request, context):
        self._model(request.name, request.version, context)
        meta = self.server.metadata[request.name]
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tm(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tm(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    def ModelConfig(self, request, context):
        self._model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=self.server.configs[request.name])

    def RepositoryIndex(self, request, context):
        index = pb.RepositoryIndexResponse()
        for m in self.server.index():
            if request.ready and m["state"] != "READY":
                continue
            index.models.add(name=m["name"], version=m["version"], state=m["state"], reason=m["reason"])
        return index

    def ModelStatistics(self, request, context):
        names = [request.name] if request.name else sorted(self.server.models)
        out = pb.ModelStatisticsResponse()
        for name in names:
            self._answer(self.server.statistics_model, name, request.version, context=context)
            stats = self.server.metrics.statistics(name)
            s = out.model_stats.add(name=name, version="1", last_inference=stats["last_inference"],
                                    inference_count=stats["inference_count"],
                                    execution_count=stats["execution_count"])
            for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                count, ns = stats[key]
                getattr(s.inference_stats, key).count, getattr(s.inference_stats, key).ns = count, ns
        return out

    @staticmethod
    def _answer(fn, *args, context):
        """fn(*args), or the call aborted with the error's status."""
        try:
            return fn(*args)
        except BdLoraError as err:
            context.abort(*status_of(err))

    # repository, logging, trace (control.py) ------------------------------------
    def RepositoryModelLoad(self, request, context):
        if request.repository_name:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "'repository_name' specification is not supported")
        parameters = {}
        for key, value in request.parameters.items():
            choice = value.WhichOneof("parameter_choice")
            if key == "config" and choice != "string_param":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "invalid value type for load parameter 'config', expected string_param.")
            parameters[key] = getattr(value, choice) if choice else None
        self._answer(self.server.load, request.model_name, parameters, context=context)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        if request.repository_name:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "'repository_name' specification is not supported")
        dependents = self._answer(control.unload_dependents, grpc_parameters(request.parameters), context=context)
        self.server.unload(request.model_name, dependents)
        return pb.RepositoryModelUnloadResponse()

    def LogSettings(self, request, context):
        values = {}
        for key, value in request.settings.items():
            choice = value.WhichOneof("parameter_choice")
            values[key] = getattr(value, choice) if choice else None
        settings = self._answer(control.update_log_settings, values, context=context)
        response = pb.LogSettingsResponse()
        for key, value in settings.items():
            field = ("bool_param" if isinstance(value, bool) else "uint32_param" if isinstance(value, int)
                     else "string_param")
            setattr(response.settings[key], field, value)
        return response

    def TraceSetting(self, request, context):
        model = request.model_name
        if model and not self.server.ready(model):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Request for unknown model : {model}")
        changes = {key: list(value.value) or None for key, value in request.settings.items()}
        settings = self._answer(self.server.tracer.update, model, changes, context=context)
        response = pb.TraceSettingResponse()
        for key, value in settings.items():
            response.settings[key].value.extend(value if isinstance(value, list) else [value])
        return response

    # system shared memory (shm.py) ------------------------------------------------
    def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._answer(self.regions.status, request.name, context=context):
            response.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    def SystemSharedMemoryRegister(self, request, context):
        self._answer(self.regions.register, request.name, request.key, request.offset, request.byte_size,
                     context=context)
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(self, request, context):
        self.regions.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # inference ---------------------------------------------------------------
    def ModelInfer(self, request, context):
        if not self.unary_slots.acquire():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.unary_slots.refusal())
        try:
            return self._infer(request, context)
        finally:
            self.unary_slots.release()

    def _infer(self, request, context):
        ctx = CallContext(request.id, decoupled=False, call=self.server.metrics.call(PROTOCOL))
        context.add_callback(ctx.cancelled.set)
        with ctx.call:  # an abort (an exception) counts the call as failed
            try:
                if self.server.decoupled(request.model_name, request.model_version):
                    raise UnimplementedError(DECOUPLED_REFUSAL)
                infer = from_grpc(request, self.regions)
                responses = [r for r in self.server.infer(infer, ctx, request.model_version) if r.outputs]
            except Exception as err:  # noqa: BLE001 - every failure is the client's answer, never the server's end
                context.abort(*status_of(err))
            if not responses:  # e.g. a `stop` request: answered without outputs
                ctx.call.finish(ok=True)
                return to_grpc(request.model_name, request.id, {})
            if len(responses) != 1:
                context.abort(grpc.StatusCode.INTERNAL, f"model '{request.model_name}' sent {len(responses)} responses "
                              "to a unary request: use ModelStreamInfer")
            started = time.perf_counter_ns()
            try:
                out = to_grpc(request.model_name, request.id, responses[0].outputs, None, self.regions,
                              infer.output_regions, parameters=responses[0].parameters)
            except BdLoraError as err:  # an output that does not fit its shared-memory region
                context.abort(*status_of(err))
            self.server.metrics.output_time(request.model_name, time.perf_counter_ns() - started)
            ctx.call.finish(ok=True)
            return out

    def ModelStreamInfer(self, request_iterator, context):
        if not self.stream_slots.acquire():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.stream_slots.refusal())
        try:
            yield from self._stream(request_iterator, context)
        finally:
            self.stream_slots.release()

    def _stream(self, request_iterator, context):
        """Decoupled: each request runs in its own thread; responses interleave on the stream."""
        responses: queue.Queue = queue.Queue()
        live = [0]
        lock = threading.Lock()
        reader_done = threading.Event()
        closed = threading.Event()
        context.add_callback(closed.set)

        def run(request):
            ctx = CallContext(request.id, decoupled=True, cancelled=closed, call=self.server.metrics.call(PROTOCOL))
            empty_final = request.parameters[EMPTY_FINAL].bool_param if EMPTY_FINAL in request.parameters else False
            final_sent = False
            try:
                infer = from_grpc(request, self.regions)
                for r in self.server.infer(infer, ctx, request.model_version):
                    if not r.outputs and not (r.final and empty_final):
                        continue
                    final_sent = r.final
                    response = to_grpc(request.model_name, request.id, r.outputs, r.final if empty_final else None,
                                       self.regions, infer.output_regions, parameters=r.parameters)
                    responses.put(pb.ModelStreamInferResponse(infer_response=response))
                if empty_final and not final_sent:
                    responses.put(pb.ModelStreamInferResponse(
                        infer_response=to_grpc(request.model_name, request.id, {}, True)))
                ctx.call.finish(ok=True)
            except Exception as err:  # noqa: BLE001 - an error response on the stream, never the server's end
                ctx.call.finish(ok=False)
                responses.put(pb.ModelStreamInferResponse(
                    error_message=status_of(err)[1], infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                                                 id=request.id)))
            finally:
                with lock:
                    live[0] -= 1

        def read():
            try:
                for request in request_iterator:
                    with lock:
                        full = live[0] >= self.unary_slots.limit  # one stream holds at most this many requests
                        live[0] += 0 if full else 1
                    if full:
                        responses.put(pb.ModelStreamInferResponse(
                            error_message=self.unary_slots.refusal(),
                            infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id)))
                        continue
                    threading.Thread(target=run, args=(request,), daemon=True).start()
            except Exception:  # the client closed the stream abruptly; in-flight requests are cancelled
                closed.set()
            finally:
                reader_done.set()

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                yield responses.get(timeout=0.2)
            except queue.Empty:
                with lock:
                    if reader_done.is_set() and live[0] == 0 and responses.empty():
                        return


def connection_options(settings: EdgeSettings, max_connections: int) -> list[tuple[str, int]]:
    """gRPC core's own connection limits (channel arguments): beyond `max_connections` a new connection is closed
    at accept (its connection quota); one that does not finish the HTTP/2 handshake within the header timeout is
    closed; one without calls for --grpc-max-connection-idle, or older than --grpc-max-connection-age, is sent a
    GOAWAY (calls in flight finish)."""
    options = [("grpc.max_allowed_incoming_connections", max_connections),
               ("grpc.server_handshake_timeout_ms", int(settings.header_timeout * 1000))]
    if settings.grpc_max_connection_idle:
        options.append(("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle * 1000)))
    if settings.grpc_max_connection_age:
        options += [("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(settings.grpc_max_connection_age * 1000))]
    return options


def start_server(server: ModelServer, host: str, port: int, capacity: Capacity | None = None,
                 settings: EdgeSettings | None = None, max_connections: int | None = None,
                 regions: SharedMemoryRegions | None = None) -> grpc.Server:
    """Listen on host:port, or raise BdLoraError at once when the port is taken (gRPC's SO_REUSEPORT is off, so a
    second server cannot share a port with a running one)."""
    capacity = capacity or Capacity()
    settings = settings or EdgeSettings()
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.so_reuseport", 0),
               *connection_options(settings, max_connections or settings.max_connections or DEFAULT_MAX_CONNECTIONS)]
    interceptors = [ApiKeyInterceptor(ApiKeys(settings.api_keys))] if settings.api_keys else []
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=capacity.workers, thread_name_prefix="grpc"),
                              options=options, interceptors=interceptors)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(server, capacity, regions), grpc_server)
    try:
        bound = grpc_server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0 or (port != 0 and bound != port):
        grpc_server.stop(None)
        raise BdLoraError(f"cannot listen on {host}:{port} (--grpc-port): address already in use or not available")
    grpc_server.start()
    return grpc_server

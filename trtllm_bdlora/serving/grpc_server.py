"""KServe-v2 gRPC endpoint (the service shipped in `tritonclient`) that looks like the `ensemble` model of
TensorRT-LLM's Triton `inflight_batcher_llm` repository, so one `tritonclient` script talks to this server
and to production Triton alike.
"""

from __future__ import annotations

import queue
import threading
from concurrent import futures

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from trtllm_bdlora import __version__
from trtllm_bdlora.engine.requests import parse_request
from trtllm_bdlora.errors import BdLoraError, RequestError
from trtllm_bdlora.serving.runtime import Runtime, Submission

MODEL = "ensemble"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# name: (datatype, dims without the batch dimension, optional)
INPUTS = {
    "text_input": ("BYTES", [1], False),
    "max_tokens": ("INT32", [1], False),
    "temperature": ("FP32", [1], True),
    "top_p": ("FP32", [1], True),
    "random_seed": ("UINT64", [1], True),
    "stream": ("BOOL", [1], True),
    "lora_task_id": ("UINT64", [1], True),
    "lora_weights": ("FP16", [-1, -1], True),
    "lora_config": ("INT32", [-1, 3], True),
}
OUTPUTS = {"text_output": ("BYTES", [-1])}
WEIGHT_DTYPES = ("FP16", "FP32", "BF16")


class _AnyAdapter:
    """Adapter ids are checked by the runtime (they may be registered by the request itself)."""

    def __contains__(self, task_id) -> bool:
        return True


def _decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    tensors = {}
    raw = list(request.raw_input_contents)
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in INPUTS:
            raise RequestError(f"unexpected input {tensor.name!r}; inputs are {', '.join(INPUTS)}")
        want_type, _, _ = INPUTS[tensor.name]
        allowed = WEIGHT_DTYPES if tensor.name == "lora_weights" else (want_type,)
        if tensor.datatype not in allowed:
            raise RequestError(f"input {tensor.name} must be {'/'.join(allowed)}, got {tensor.datatype}")
        shape = list(tensor.shape)
        if i < len(raw):
            if tensor.datatype == "BYTES":
                array = deserialize_bytes_tensor(raw[i])
            elif tensor.datatype == "BF16":
                bits = np.frombuffer(raw[i], dtype=np.uint16).astype(np.uint32) << 16
                array = bits.view(np.float32)
            else:
                array = np.frombuffer(raw[i], dtype=triton_to_np_dtype(tensor.datatype))
        elif tensor.datatype == "BYTES":
            array = np.array(list(tensor.contents.bytes_contents), dtype=object)
        else:
            field = {"INT32": "int_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                     "BOOL": "bool_contents"}.get(tensor.datatype)
            if field is None:
                raise RequestError(f"input {tensor.name}: send {tensor.datatype} as raw_input_contents")
            array = np.array(list(getattr(tensor.contents, field)), dtype=triton_to_np_dtype(tensor.datatype))
        if int(np.prod(shape)) != array.size:
            raise RequestError(f"input {tensor.name}: shape {shape} does not match its {array.size} elements")
        tensors[tensor.name] = array.reshape(shape)
    return tensors


def _scalar(tensors: dict, name: str, default=None):
    if name not in tensors:
        if default is None and not INPUTS[name][2]:
            raise RequestError(f"missing required input {name}")
        return default
    value = tensors[name]
    if value.size != 1:
        raise RequestError(f"input {name} must hold one value per request (batch size 1), got shape {list(value.shape)}")
    return value.reshape(-1)[0]


class EnsembleService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.engine = runtime.engine

    # health and metadata -----------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.runtime.healthy and not self.runtime.stopping.is_set())

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == MODEL and self.runtime.healthy)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="trtllm-bdlora", version=__version__, extensions=[])

    def _check_model(self, name: str, context) -> None:
        if name != MODEL:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} not found; this server serves {MODEL!r}")

    def ModelMetadata(self, request, context):
        self._check_model(request.name, context)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=MODEL, versions=["1"], platform="ensemble",
            inputs=[tm(name=n, datatype=t, shape=[-1, *d]) for n, (t, d, _) in INPUTS.items()],
            outputs=[tm(name=n, datatype=t, shape=[-1, *d]) for n, (t, d) in OUTPUTS.items()],
        )

    def ModelConfig(self, request, context):
        self._check_model(request.name, context)
        dtype = {"BYTES": mc.TYPE_STRING, "INT32": mc.TYPE_INT32, "FP32": mc.TYPE_FP32, "UINT64": mc.TYPE_UINT64,
                 "BOOL": mc.TYPE_BOOL, "FP16": mc.TYPE_FP16}
        config = mc.ModelConfig(
            name=MODEL, platform="ensemble", max_batch_size=self.runtime.scheduler.max_batch_size,
            input=[mc.ModelInput(name=n, data_type=dtype[t], dims=d, optional=o) for n, (t, d, o) in INPUTS.items()],
            output=[mc.ModelOutput(name=n, data_type=dtype[t], dims=d) for n, (t, d) in OUTPUTS.items()],
        )
        return pb.ModelConfigResponse(config=config)

    # inference ---------------------------------------------------------------
    def _submission(self, request: pb.ModelInferRequest, on_token, on_done) -> tuple[Submission, bool]:
        if request.model_name != MODEL:
            raise RequestError(f"model {request.model_name!r} not found; this server serves {MODEL!r}")
        tensors = _decode_inputs(request)
        text = _scalar(tensors, "text_input")
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        task = _scalar(tensors, "lora_task_id", 0)
        obj = {
            "id": request.id, "prompt": text, "max_tokens": int(_scalar(tensors, "max_tokens")),
            "temperature": float(_scalar(tensors, "temperature", 0.0)), "top_p": float(_scalar(tensors, "top_p", 1.0)),
            "seed": int(_scalar(tensors, "random_seed", 0)), "adapter": int(task) or None,
        }
        req = parse_request(0, obj, self.engine.tokenizer, self.engine.shape.vocab_size, self.engine.max_seq_len,
                            _AnyAdapter())
        req.on_token = on_token
        weights, config = tensors.get("lora_weights"), tensors.get("lora_config")
        if (weights is None) != (config is None):
            raise RequestError("send lora_weights and lora_config together")
        stream = bool(_scalar(tensors, "stream", False))
        return Submission(req, weights, config, on_done), stream

    def _response(self, request, text: str, final: bool | None = None) -> pb.ModelInferResponse:
        out = pb.ModelInferResponse(model_name=MODEL, model_version="1", id=request.id)
        out.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
        out.raw_output_contents.append(serialize_byte_tensor(np.array([text.encode()], dtype=object)).item())
        if final is not None:
            out.parameters["triton_final_response"].bool_param = final
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def ModelInfer(self, request, context):
        done = threading.Event()
        result: dict = {}

        def on_done(ids, error):
            result.update(ids=ids, error=error)
            done.set()

        try:
            sub, _ = self._submission(request, None, on_done)
            self.runtime.submit(sub)
        except BdLoraError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        while not done.wait(0.5):
            if not context.is_active():
                return pb.ModelInferResponse()
        if result["error"]:
            context.abort(grpc.StatusCode.INTERNAL if result["error"].startswith("server failed")
                          else grpc.StatusCode.INVALID_ARGUMENT, result["error"])
        return self._response(request, self._decode(result["ids"]))

    def ModelStreamInfer(self, request_iterator, context):
        """Decoupled streaming: with stream=true one response per generated token (its text delta), the last
        flagged triton_final_response; without it one response per request. Errors travel in error_message."""
        responses: queue.Queue = queue.Queue()
        open_requests = [0]
        lock = threading.Lock()
        reader_done = threading.Event()

        def finish():
            with lock:
                open_requests[0] -= 1

        def handle(request):
            state = {"ids": [], "text": ""}

            def on_token(token):
                state["ids"].append(token)
                if streaming[0]:
                    text = self._decode(state["ids"])
                    delta, state["text"] = text[len(state["text"]):], text
                    responses.put(pb.ModelStreamInferResponse(infer_response=self._response(request, delta, False)))

            def on_done(ids, error):
                if error:
                    responses.put(pb.ModelStreamInferResponse(error_message=error, infer_response=pb.ModelInferResponse(
                        model_name=MODEL, id=request.id)))
                elif streaming[0]:
                    responses.put(pb.ModelStreamInferResponse(infer_response=self._response(request, "", True)))
                else:
                    responses.put(pb.ModelStreamInferResponse(infer_response=self._response(request, self._decode(ids))))
                finish()

            streaming = [False]
            with lock:
                open_requests[0] += 1
            try:
                sub, streaming[0] = self._submission(request, on_token, on_done)
                self.runtime.submit(sub)
            except BdLoraError as err:
                responses.put(pb.ModelStreamInferResponse(error_message=str(err), infer_response=pb.ModelInferResponse(
                    model_name=MODEL, id=request.id)))
                finish()

        def read():
            try:
                for request in request_iterator:
                    handle(request)
            finally:
                reader_done.set()

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                yield responses.get(timeout=0.2)
            except queue.Empty:
                with lock:
                    if reader_done.is_set() and open_requests[0] == 0 and responses.empty():
                        return


def start_server(runtime: Runtime, host: str, port: int, workers: int = 64) -> grpc.Server:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EnsembleService(runtime), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise BdLoraError(f"cannot listen on {host}:{port}")
    server.start()
    return server

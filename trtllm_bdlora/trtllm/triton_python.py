"""Glue for the production repository's Python models (trtllm/python_models/), which run inside Triton's
Python backend: its tensors to and from numpy (BF16 through DLPack, as numpy has no bfloat16), model
parameters, errors with the status Triton reports, requests in flight with their cancellation, and a dispatch that
runs a step of the chain as a BLS request. `pb_utils` is passed in: this module imports nothing that exists only
inside Triton."""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator

import numpy as np

from trtllm_bdlora.errors import (
    AlreadyExistsError,
    BdLoraError,
    ErrorKind,
    InternalError,
    NotFoundError,
    RequestError,
    ServerUnavailableError,
    UnimplementedError,
    as_error,
)
from trtllm_bdlora.serving.repository.calls import CallContext, ModelResponse
from trtllm_bdlora.serving.repository.spec import MODELS

log = logging.getLogger("trtllm_bdlora.triton")
CANCEL_POLL_S = 0.05  # a round trip to the server per request in flight: cheap next to a step
# each error kind (errors.STATUS) as the Triton error code that Triton reports with that kind's status: INVALID_ARG
# gives INVALID_ARGUMENT / 400, UNAVAILABLE gives UNAVAILABLE / 503, UNSUPPORTED gives UNIMPLEMENTED / 501 (a TritonError
# without a code reaches clients as INTERNAL / 500). Triton 2.51 has no code for RESOURCE_EXHAUSTED / 429 or 413: a
# full queue is UNAVAILABLE there (retry elsewhere), a request too large INVALID_ARGUMENT.
TRITON_ERROR_CODES = {
    ErrorKind.INVALID_ARGUMENT: "INVALID_ARG", ErrorKind.NOT_FOUND: "NOT_FOUND", ErrorKind.ALREADY_EXISTS: "ALREADY_EXISTS",
    ErrorKind.UNAUTHENTICATED: "INVALID_ARG",
    ErrorKind.PERMISSION_DENIED: "INVALID_ARG", ErrorKind.TOO_LARGE: "INVALID_ARG",
    ErrorKind.RESOURCE_EXHAUSTED: "UNAVAILABLE", ErrorKind.UNIMPLEMENTED: "UNSUPPORTED",
    ErrorKind.UNAVAILABLE: "UNAVAILABLE", ErrorKind.INTERNAL: "INTERNAL",
}
# a composing model's Triton error code, back to the error the BLS model raises with it
CHILD_ERRORS = {"INVALID_ARG": RequestError, "NOT_FOUND": NotFoundError, "ALREADY_EXISTS": AlreadyExistsError,
                "UNAVAILABLE": ServerUnavailableError, "UNSUPPORTED": UnimplementedError}


def parameters(args: dict) -> tuple[dict, dict[str, str]]:
    """(model config, its string parameters) from `initialize`'s args."""
    config = json.loads(args["model_config"])
    return config, {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def to_numpy(tensor) -> np.ndarray:
    try:
        return tensor.as_numpy()
    except Exception:  # BF16 (and device tensors): through torch
        from torch.utils.dlpack import from_dlpack

        return from_dlpack(tensor.to_dlpack()).float().cpu().numpy()


def inputs_of(request) -> dict[str, np.ndarray]:
    return {t.name(): to_numpy(t) for t in request.inputs()}


def tensors(pb_utils, outputs: dict[str, np.ndarray], bf16: frozenset[str] = frozenset()) -> list:
    """Triton tensors; names in `bf16` go as BF16 (from floats, or from bf16 bits stored as `V2`)."""
    out = []
    for name, array in outputs.items():
        if name in bf16:
            import torch
            from torch.utils.dlpack import to_dlpack

            from trtllm_bdlora.adapters.trtllm_format import BF16_STORAGE, weights_as_torch

            values = weights_as_torch(array) if array.dtype == BF16_STORAGE else \
                torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16)
            out.append(pb_utils.Tensor.from_dlpack(name, to_dlpack(values.contiguous())))
        else:
            out.append(pb_utils.Tensor(name, np.ascontiguousarray(array)))
    return out


def bf16_outputs(config: dict) -> frozenset[str]:
    return frozenset(o["name"] for o in config.get("output", []) if o.get("data_type") == "TYPE_BF16")


def triton_error(pb_utils, err: BaseException):
    """The TritonError of an error raised while answering a request, with the code of its kind."""
    if not isinstance(err, BdLoraError):
        traceback.print_exception(err, file=sys.stderr)  # for the server's log; the client gets one line
    err = as_error(err)
    error_type = pb_utils.TritonError
    return error_type(str(err), getattr(error_type, TRITON_ERROR_CODES[err.kind]))


def error_response(pb_utils, err: BaseException):
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(pb_utils, err))


def child_error(error) -> BdLoraError:
    """A composing model's error, raised again in the BLS model with the same code."""
    error_type = type(error)
    try:
        code = error.code()
    except AttributeError:  # a stub without codes
        return RequestError(error.message())
    name = next((n for n in (*CHILD_ERRORS, "INTERNAL", "UNKNOWN") if getattr(error_type, n, None) == code), "INTERNAL")
    return CHILD_ERRORS.get(name, InternalError)(error.message())


class TritonCall:
    """One request in flight in a Python model: its inputs (copied: they are read after `execute` returns), its
    CallContext, and its answers. Decoupled, responses go out through the response sender, never after the final
    one (Triton 2.51 crashes when a request is touched after its final response); otherwise they are kept for
    `execute` to return."""

    def __init__(self, pb_utils, request, decoupled: bool):
        self.pb_utils, self.request = pb_utils, request
        self.inputs = {k: np.array(v) for k, v in inputs_of(request).items()}
        self.ctx = CallContext(request.request_id(), decoupled=decoupled)
        self.sender = request.get_response_sender() if decoupled else None
        self.lock = threading.Lock()
        self.finished = False
        self.responses: list = []

    def poll_cancelled(self) -> None:
        with self.lock:
            if not self.finished and not self.ctx.cancelled.is_set() and self.request.is_cancelled():
                self.ctx.cancelled.set()

    def send(self, outputs: dict[str, np.ndarray] | None, final: bool, bf16: frozenset[str] = frozenset()) -> None:
        """A response with `outputs` (None: the final flag alone)."""
        with self.lock:
            if self.finished:
                return
            response = None if outputs is None else self.pb_utils.InferenceResponse(
                output_tensors=tensors(self.pb_utils, outputs, bf16))
            self._send(response, final)

    def fail(self, err: BaseException) -> None:
        with self.lock:
            if not self.finished:
                self._send(error_response(self.pb_utils, err), True)

    def finish(self) -> None:
        """The final flag, if no response carried it yet."""
        with self.lock:
            if not self.finished:
                self._send(None, True)

    def _send(self, response, final: bool) -> None:
        flags = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        if self.sender is not None:
            if response is None:
                self.sender.send(flags=flags)
            else:
                self.sender.send(response, flags=flags)
        elif response is not None or final and not self.responses:
            self.responses.append(response or self.pb_utils.InferenceResponse(output_tensors=[]))
        self.finished = final


class TritonCalls:
    """Runs each request of `execute` on its own thread with `run(call)`, and polls the cancellation of those in
    flight (one thread for all: `is_cancelled` is a round trip to the server)."""

    def __init__(self, pb_utils, decoupled: bool, run: Callable[[TritonCall], None]):
        self.pb_utils, self.decoupled, self.run = pb_utils, decoupled, run
        self.active: set[TritonCall] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        threading.Thread(target=self._poll, name="bdlora-cancel", daemon=True).start()

    def execute(self, requests: list) -> list | None:
        calls = [TritonCall(self.pb_utils, request, self.decoupled) for request in requests]
        threads = [threading.Thread(target=self._run, args=(call,), daemon=True) for call in calls]
        with self.lock:
            self.active.update(calls)
        for thread in threads:
            thread.start()
        if self.decoupled:
            return None
        for thread in threads:
            thread.join()
        return [call.responses[0] for call in calls]

    def _run(self, call: TritonCall) -> None:
        try:
            self.run(call)
        except Exception as err:  # noqa: BLE001 - this request gets its error; the model keeps serving
            call.fail(err)
        finally:
            call.finish()
            with self.lock:
                self.active.discard(call)

    def _poll(self) -> None:
        while not self.stopping.wait(CANCEL_POLL_S):
            with self.lock:
                calls = list(self.active)
            for call in calls:
                try:
                    call.poll_cancelled()
                except Exception:  # noqa: BLE001 - a request the server already released
                    log.debug("is_cancelled failed", exc_info=True)

    def stop(self) -> None:
        self.stopping.set()


def triton_dispatch(pb_utils, bf16: frozenset[str] = frozenset()):
    """A Dispatch (see ensemble.py) that runs each step as a BLS request to the model of that name. A decoupled step
    (tensorrt_llm) is stopped when the call is cancelled, at once, with the backend's `stop` input (Triton 2.51
    cannot cancel a BLS request), under a request id of its own when the client sent none."""

    def outputs_of(response) -> dict[str, np.ndarray]:
        if response.has_error():
            raise child_error(response.error())
        return {t.name(): to_numpy(t) for t in response.output_tensors()}

    def stop(name: str, request_id: str) -> None:
        request = pb_utils.InferenceRequest(model_name=name, requested_output_names=[], request_id=request_id,
                                            inputs=tensors(pb_utils, {
                                                "input_ids": np.zeros((1, 1), np.int32),
                                                "input_lengths": np.zeros((1, 1), np.int32),
                                                "request_output_len": np.zeros((1, 1), np.int32),
                                                "stop": np.ones((1, 1), bool)}))
        list(request.exec(decoupled=True))

    def dispatch(name: str, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        spec = MODELS[name]
        request_id = ctx.request_id or (f"bls-{uuid.uuid4().hex}" if spec.decoupled else "")
        request = pb_utils.InferenceRequest(model_name=name, inputs=tensors(pb_utils, inputs, bf16),
                                            requested_output_names=[t.name for t in spec.outputs],
                                            request_id=request_id)
        if not spec.decoupled:
            yield ModelResponse(outputs_of(request.exec()))
            return
        done = threading.Event()

        def stop_when_cancelled():
            while not done.wait(CANCEL_POLL_S):
                if ctx.is_cancelled():
                    stop(name, request_id)
                    return

        threading.Thread(target=stop_when_cancelled, daemon=True).start()
        exhausted = False
        try:
            for response in request.exec(decoupled=True):
                if ctx.is_cancelled():
                    return
                outputs = outputs_of(response)
                if outputs:
                    yield ModelResponse(outputs, final=False)
            exhausted = True
        finally:
            done.set()
            if not exhausted and ctx.is_cancelled():  # left early: the step must not run on for nobody
                stop(name, request_id)

    return dispatch

"""What a served model is to the gRPC and HTTP front ends: a decoded request, checked against the model configuration as
Triton checks it; inputs in, a stream of responses out."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from trtllm_bdlora.errors import BdLoraError, RequestError, as_error, public_text
from trtllm_bdlora.serving.metrics import ClientCall
from trtllm_bdlora.serving.repository.config import wire_type
from trtllm_bdlora.serving.repository.spec import Model

log = logging.getLogger("trtllm_bdlora.edge")


@dataclass
class WireTensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray


@dataclass
class InferRequest:
    model: str
    id: str = ""
    inputs: list[WireTensor] = field(default_factory=list)
    outputs: list[str] | None = None  # requested output names; None: all
    binary_outputs: set[str] | bool = True  # HTTP only: which outputs go as binary data
    parameters: dict = field(default_factory=dict)
    output_regions: dict = field(default_factory=dict)  # output name -> where in system shared memory it goes


@dataclass
class CallContext:
    request_id: str = ""
    decoupled: bool = True  # the transport takes many responses (ModelStreamInfer, generate_stream)
    parameters: dict = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    queued_ns: int = 0  # time this call's core requests waited in the runtime's queue (for metrics)
    parent: CallContext | None = None
    model: str = ""  # the model the client called (for the access log)
    call: ClientCall | None = None  # the client's request, as the metrics count it per protocol

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set() or (self.parent is not None and self.parent.is_cancelled())

    def child(self) -> CallContext:
        """A context that can be cancelled on its own, and is cancelled with this one."""
        return CallContext(self.request_id, self.decoupled, self.parameters, parent=self, model=self.model, call=self.call)


@dataclass
class ModelResponse:
    outputs: dict[str, np.ndarray]
    final: bool = True
    parameters: dict = field(default_factory=dict)  # the response's parameters (an ensemble's: its sequence fields)


class ServedModel(Protocol):
    spec: Model

    def infer(self, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        """Responses for one request; raises RequestError for a bad request (before or between responses)."""
        ...


def scalar(inputs: dict[str, np.ndarray], name: str, row: int = 0, default=None):
    """The value of a one-per-request input for batch row `row`, as a Python value (None when absent)."""
    array = inputs.get(name)
    if array is None or array.size == 0:
        return default
    value = array.reshape(array.shape[0], -1)[row if array.shape[0] > 1 else 0]
    value = value.reshape(-1)[0]
    return value.item() if hasattr(value, "item") else value


def error_status(err: BaseException) -> tuple[str, int, str]:
    """(gRPC status code name, HTTP status, one-line message) of an error raised while answering a call, from the one
    table of errors.py. Anything unexpected is INTERNAL, and says so only: its type, message and traceback go to the
    server's log (once per interval for a repeated one), never to the client; nor do host paths (`public_text`)."""
    if not isinstance(err, BdLoraError):
        log.error("unexpected error while answering a call: %s", one_line(err), exc_info=err)
    err = as_error(err, "internal error while answering this call")
    return err.status.grpc, err.status.http, public_text(str(err))


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def check_inputs(model: Model, tensors: list[WireTensor], values: dict[str, str], max_batch_size: int,
                 request_id: str = "") -> dict[str, np.ndarray]:
    """Triton's checks of an inference request against the model configuration, in its order and with its words
    (core InferenceRequest::Normalize): inputs the model does not declare, required inputs missing, each input's data
    type (exactly the declared one) and shape, the batch size."""
    where = f"[request id: {request_id or '<id_unknown>'}]"
    out: dict[str, np.ndarray] = {}
    for t in tensors:
        if model.input(t.name) is None:
            raise RequestError(f"unexpected inference input '{t.name}' for model '{model.name}'")
        if t.name in out:
            raise RequestError(f"input {t.name} given twice")
        out[t.name] = t.array
    required = [s.name for s in model.inputs if not s.optional]
    missing = [name for name in required if name not in out]
    if missing:
        raise RequestError(f"{where} expected number of inputs between {len(required)} and {len(model.inputs)} but got "
                           f"{len(out)} inputs for model '{model.name}'. Got input(s) {list(out)}, but missing required "
                           f"input(s) {missing}. Please provide all required input(s).")
    batch = None
    for t in tensors:
        spec = model.input(t.name)
        want = wire_type(spec, values)
        if t.datatype != want:
            raise RequestError(f"{where} inference input '{t.name}' data-type is '{t.datatype}', but model "
                               f"'{model.name}' expects '{want}'")
        expected = [-1, *spec.dims]
        if len(t.shape) != len(expected) or any(e != -1 and e != d for e, d in zip(expected, t.shape)):
            raise RequestError(f"{where} unexpected shape for input '{t.name}' for model '{model.name}'. Expected "
                               f"{_dims(expected)}, got {_dims(t.shape)}. {BATCH_DIM_NOTE}")
        if batch is None:
            batch = t.shape[0]
        elif t.shape[0] != batch and not spec.ragged:
            raise RequestError(f"input {t.name} has batch size {t.shape[0]}, other inputs {batch}")
    if batch is not None and batch > max_batch_size:
        raise RequestError(f"{where} inference request batch-size must be <= {max_batch_size} for '{model.name}'")
    if batch is not None and batch < 1:
        raise RequestError(f"{where} inference request batch-size must be >= 1 for '{model.name}', got {batch}")
    return out


# Triton's advice after a shape without the batch dimension (every model here batches)
BATCH_DIM_NOTE = ("NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be prepended "
                  "to each input shape. If you want to specify the full shape including the batch dim in your input "
                  "dims config, try setting max_batch_size to zero. See the model configuration docs for more info on "
                  "max_batch_size.")


def _dims(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"

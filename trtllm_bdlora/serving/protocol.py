"""What a served model is to the gRPC and HTTP front ends: inputs in, a stream of responses out."""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from trtllm_bdlora.errors import AdapterCacheFullError, BdLoraError, ServerBusyError, ServerUnavailableError
from trtllm_bdlora.serving.interface import Model

# message prefixes of errors that reach the front ends as plain strings (the runtime's on_done)
UNAVAILABLE_PREFIXES = ("server is shutting down",)
INTERNAL_PREFIXES = ("server failed",)


@dataclass
class CallContext:
    request_id: str = ""
    decoupled: bool = True  # the transport takes many responses (ModelStreamInfer, generate_stream)
    parameters: dict = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    queued_ns: int = 0  # time this call's core requests waited in the runtime's queue (for metrics)
    parent: CallContext | None = None
    model: str = ""  # the model the client called (for the access log)

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set() or (self.parent is not None and self.parent.is_cancelled())

    def child(self) -> CallContext:
        """A context that can be cancelled on its own, and is cancelled with this one."""
        return CallContext(self.request_id, self.decoupled, self.parameters, parent=self, model=self.model)


@dataclass
class ModelResponse:
    outputs: dict[str, np.ndarray]
    final: bool = True


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
    """(gRPC status code name, HTTP status, one-line message) for an error raised while answering a call.
    Retryable conditions get the codes clients retry on: a full queue or adapter cache RESOURCE_EXHAUSTED / 429,
    a server shutting down UNAVAILABLE / 503; a bad request INVALID_ARGUMENT / 400; anything unexpected
    INTERNAL / 500 with its type and first line (the traceback goes to the server's log, never to the client)."""
    from trtllm_bdlora.serving.model_server import ModelNotFound

    if not isinstance(err, BdLoraError):
        traceback.print_exception(err, file=sys.stderr)
        first = str(err).splitlines()[0] if str(err) else ""
        return "INTERNAL", 500, f"internal error: {type(err).__name__}: {first}"
    message = str(err)
    if isinstance(err, ModelNotFound):
        return "NOT_FOUND", 404, message
    if isinstance(err, (ServerBusyError, AdapterCacheFullError)):
        return "RESOURCE_EXHAUSTED", 429, message
    if isinstance(err, ServerUnavailableError) or message.startswith(UNAVAILABLE_PREFIXES):
        return ("INTERNAL", 500, message) if message.startswith(INTERNAL_PREFIXES) else ("UNAVAILABLE", 503, message)
    if message.startswith(INTERNAL_PREFIXES):
        return "INTERNAL", 500, message
    return "INVALID_ARGUMENT", 400, message

"""What a served model is to the gRPC and HTTP front ends: inputs in, a stream of responses out."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from trtllm_bdlora.serving.interface import Model


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

"""What the KServe front ends share: their limits, refusals and the extensions they advertise."""

from __future__ import annotations

import threading
from dataclasses import dataclass

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# exactly what the front ends serve, in Triton's order (tritonserver's ServerMetadata), then `generate`
EXTENSIONS = ["model_repository", "model_repository(unload_dependents)", "model_configuration", "system_shared_memory",
              "binary_tensor_data", "parameters", "statistics", "trace", "logging", "generate"]
# refusals beyond the front ends' capacity; a call beyond the queue starts with Triton core's queue-full wording
STREAMS_REFUSAL = "Exceeds maximum number of concurrent streams: {limit} open (--max-streams), retry later"
CALLS_REFUSAL = ("Exceeds maximum queue size: {limit} inference calls already in progress (--max-queue + "
                 "--max-batch-size), retry later")


@dataclass
class Capacity:
    """Separate capacity for inference and for everything else: at most `streams` ModelStreamInfer calls and
    `unary` ModelInfer calls hold a worker thread at once (more are refused with RESOURCE_EXHAUSTED), and the
    pool keeps `reserve` workers beyond them, so health, metadata and statistics answer under any load."""

    streams: int = 128
    unary: int = 272
    reserve: int = 16

    @property
    def workers(self) -> int:
        return self.streams + self.unary + self.reserve


class CallSlots:
    """A counter that refuses instead of waiting."""

    def __init__(self, limit: int, refusal: str):
        self.limit, self.refusal_text, self.used = limit, refusal, 0
        self.lock = threading.Lock()

    def acquire(self) -> bool:
        with self.lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.used -= 1

    def refusal(self) -> str:
        return self.refusal_text.format(limit=self.limit)

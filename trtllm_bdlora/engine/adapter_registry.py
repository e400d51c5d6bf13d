"""Who a `lora_task_id` belongs to (rank 0): an id means the same weights for the whole life of the server.

- The first request that registers an id with `lora_weights` + `lora_config` binds the id to a digest of them;
  a later request that sends weights for the id must send the same adapter (same digest, whatever float
  type carries it), else it is refused and the registered adapter keeps serving. The binding outlives
  eviction from the host cache (for the last `remembered` ids), so an evicted id cannot be taken over either.
- Ids registered at start-up (`--adapter ID=DIR`) are immutable: a request may resend one only in the exact
  form `convert-adapter` writes for it (at TP 1 or the server's TP, in float16, bfloat16 or float32).
- `--no-allow-request-adapters` turns request-time registration off: only start-up ids are served.

TensorRT-LLM's PEFT cache keeps the first weights of an id and serves later requests with them whatever they
carry; this is the check it lacks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from trtllm_bdlora.adapters.trtllm_format import WEIGHT_DTYPES, _bf16_as_float32, convert_adapter
from trtllm_bdlora.errors import BdLoraError, RequestError

REMEMBERED_IDS = 1 << 16  # request-registered ids whose digest is kept (about 100 bytes each)


def adapter_digest(weights, config) -> bytes:
    """A digest of an adapter in TensorRT-LLM's request format that does not depend on the float type carrying
    the weights (values compared as float32) or on a leading batch dimension of 1."""
    c = np.ascontiguousarray(np.asarray(config).reshape(-1, 3), dtype=np.int64)
    w = np.ascontiguousarray(_bf16_as_float32(weights), dtype=np.float32)
    w = w.reshape(c.shape[0], -1) if c.shape[0] and w.size % c.shape[0] == 0 else w.reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    for part in (str(c.shape).encode(), c.tobytes(), str(w.shape).encode(), w.tobytes()):
        h.update(part)
    return h.digest()


class AdapterOwners:
    def __init__(self, allow_request_adapters: bool = True, remembered: int = REMEMBERED_IDS):
        self.allow_request_adapters = allow_request_adapters
        self.startup: dict[int, set[bytes]] = {}  # id -> digests of the forms it may be resent in
        self.registered: OrderedDict[int, bytes] = OrderedDict()  # request-registered ids, oldest first
        self.remembered = remembered

    def add_startup(self, task_id: int, adapter, tp: int) -> None:
        forms = set()
        for form_tp in sorted({1, tp}):
            for dtype in WEIGHT_DTYPES:
                try:
                    forms.add(adapter_digest(*convert_adapter(adapter, form_tp, dtype)))
                except BdLoraError:  # a form that cannot be written (e.g. blocks that do not fit): never matches
                    continue
        self.startup[task_id] = forms

    def check(self, task_id: int, weights, config) -> bytes:
        """Before weights sent with a request are used for `task_id`: their digest, or a RequestError when the
        id is bound to other weights or request-time registration is off."""
        digest = adapter_digest(weights, config)
        if task_id in self.startup:
            if digest not in self.startup[task_id]:
                raise RequestError(
                    f"lora_task_id {task_id} is registered at start-up (--adapter) and cannot be replaced: these "
                    "lora_weights differ from it; send the request without lora_weights, or use another id")
            return digest
        known = self.registered.get(task_id)
        if known is not None and known != digest:
            raise RequestError(
                f"lora_task_id {task_id} is registered with different lora_weights (digest mismatch); an id keeps "
                "the adapter it was first registered with: use another lora_task_id, or send no lora_weights")
        if known is None and not self.allow_request_adapters:
            raise RequestError(f"lora_task_id {task_id} is not registered at start-up and this server does not "
                               "register adapters sent with requests (--no-allow-request-adapters)")
        return digest

    def bind(self, task_id: int, digest: bytes, resident=()) -> None:
        """After a request registered `task_id` with weights of this digest. Beyond `remembered` ids, the oldest
        binding of an id no longer in `resident` (the host cache) is forgotten."""
        if task_id in self.startup:
            return
        self.registered[task_id] = digest
        self.registered.move_to_end(task_id)
        if len(self.registered) > self.remembered:
            gone = [t for t in self.registered if t not in resident][: len(self.registered) - self.remembered]
            for t in gone:
                del self.registered[t]

"""The one adapter identity registry (rank 0): an adapter id means one set of weights, whatever the front end.

An id is bound to its weights by its first registration, from any entry: `--adapter ID=DIR` at start-up, a request's
`lora_weights` + `lora_config` (KServe), or the OpenAI API's load. A binding is a set of digests of the forms the
same adapter may arrive in: a request adapter's own digest (independent of the float type carrying it); for an
adapter read from a PEFT directory, the forms `convert-adapter` writes for it (TP 1 or the server's TP, float16,
bfloat16 or float32). Weights sent for a bound id must match the binding, on every front end, else they are
refused with one line naming the id and the registered adapter keeps serving. A binding outlives LRU eviction
from the host cache (for the last `remembered` request-registered ids), so an evicted id cannot be taken over;
only an unload that completed (no pending request names the id) ends it. Start-up ids are never unbound, and
`--no-allow-request-adapters` turns request-time registration off.

TensorRT-LLM's PEFT cache keeps the first weights of an id and serves later requests with them whatever they
carry; this is the check it lacks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Binding:
    forms: frozenset[bytes]
    source: str  # "--adapter", "request" or "load"


def directory_forms(adapter, tp: int) -> frozenset[bytes]:
    """Digests of the request-format forms of an adapter read from a PEFT directory."""
    forms = set()
    for form_tp in sorted({1, tp}):
        for dtype in WEIGHT_DTYPES:
            try:
                forms.add(adapter_digest(*convert_adapter(adapter, form_tp, dtype)))
            except BdLoraError:  # a form that cannot be written (e.g. blocks that do not fit): never matches
                continue
    return frozenset(forms)


class AdapterRegistry:
    def __init__(self, tp: int = 1, allow_request_adapters: bool = True, remembered: int = REMEMBERED_IDS):
        self.tp, self.allow_request_adapters, self.remembered = tp, allow_request_adapters, remembered
        self.bindings: OrderedDict[int, Binding] = OrderedDict()  # oldest first

    def source(self, task_id: int) -> str | None:
        binding = self.bindings.get(task_id)
        return None if binding is None else binding.source

    def bind_directory(self, task_id: int, adapter, source: str) -> None:
        """`--adapter` at start-up or the OpenAI API's load: bind `task_id` to an adapter read from a directory,
        or refuse when it is bound to other weights."""
        forms = directory_forms(adapter, self.tp)
        known = self.bindings.get(task_id)
        if known is not None and not known.forms & forms:
            raise RequestError(f"lora_task_id {task_id} is registered ({known.source}) with other weights; an id keeps "
                               "the adapter it was first registered with until it is unloaded: use another id")
        self.bindings[task_id] = Binding(forms if known is None else known.forms | forms, known.source if known else source)
        self.bindings.move_to_end(task_id)

    def check_request(self, task_id: int, weights, config) -> bytes:
        """Before weights sent with a request are used for `task_id`: their digest, or a RequestError when the id
        is bound to other weights or request-time registration is off."""
        digest = adapter_digest(weights, config)
        known = self.bindings.get(task_id)
        if known is not None and digest not in known.forms:
            if known.source == "--adapter":
                raise RequestError(
                    f"lora_task_id {task_id} is registered at start-up (--adapter) and cannot be replaced: these "
                    "lora_weights differ from it; send the request without lora_weights, or use another id")
            raise RequestError(
                f"lora_task_id {task_id} is registered with different lora_weights (digest mismatch); an id keeps "
                "the adapter it was first registered with: use another lora_task_id, or send no lora_weights")
        if known is None and not self.allow_request_adapters:
            raise RequestError(f"lora_task_id {task_id} is not registered at start-up and this server does not "
                               "register adapters sent with requests (--no-allow-request-adapters)")
        return digest

    def bind_request(self, task_id: int, digest: bytes, resident=()) -> None:
        """After a request registered `task_id` with weights of this digest. Beyond `remembered` request-registered
        ids, the oldest binding of an id no longer in `resident` (the host cache) is forgotten."""
        if task_id in self.bindings:
            self.bindings.move_to_end(task_id)
            return
        self.bindings[task_id] = Binding(frozenset({digest}), "request")
        requested = [t for t, b in self.bindings.items() if b.source == "request"]
        if len(requested) > self.remembered:
            for t in [t for t in requested if t not in resident][: len(requested) - self.remembered]:
                del self.bindings[t]

    def unbind(self, task_id: int) -> None:
        """An unload completed: the id is free for other weights."""
        self.bindings.pop(task_id, None)

"""The step plan: everything rank 0 tells every rank to do in one engine step, as one typed value.

Rank 0 decides (the scheduler, the adapter cache) and broadcasts the plan as JSON (never pickle); every rank,
rank 0 included, executes the same plan in the same order (`Engine.execute`): evict adapters, add the adapters
uploaded with the plan, free finished sequences, load adapters into slots, run the forward pass. An adapter
upload carries its description here and its factors as one flat float32 tensor broadcast right after the plan
(`adapters/lora.py` `adapter_to_wire`): the one wire format of every adapter, whatever its entry (`--adapter`,
a request's `lora_weights`, the OpenAI API's load). The empty plan is the idle heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SeqChunk:
    """`tokens` of sequence `seq_id` at positions start..start+len(tokens), with the adapter in slot `slot` (-1: none)."""

    seq_id: int
    tokens: list[int]
    start: int
    slot: int


@dataclass(frozen=True)
class AdapterUpload:
    """An adapter added to every rank's host cache: `meta` is its wire description (`adapter_to_wire`)."""

    task_id: int
    pinned: bool
    meta: dict


@dataclass
class StepPlan:
    evict: list[int] = field(default_factory=list)  # adapters leaving the host cache
    uploads: list[AdapterUpload] = field(default_factory=list)  # adapters joining it
    free: list[int] = field(default_factory=list)  # sequences whose KV cache is freed
    loads: list[tuple[int, int]] = field(default_factory=list)  # (slot, task id) copies into device slots
    chunks: list[SeqChunk] = field(default_factory=list)  # the forward pass's tokens
    all_logits: bool = False  # logits of every token, not only each chunk's last
    # prefix caching: (source, target, n) copies the KV of positions 0..n-1 from a running or kept sequence to a new one
    # whose first chunk starts at n, before the forward pass
    copies: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.evict or self.uploads or self.free or self.loads or self.chunks)

    def to_json(self) -> dict:
        out: dict = {}
        for key in ("evict", "free"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.uploads:
            out["uploads"] = [[u.task_id, u.pinned, u.meta] for u in self.uploads]
        if self.loads:
            out["loads"] = [list(load) for load in self.loads]
        if self.chunks:
            out["chunks"] = [[c.seq_id, c.tokens, c.start, c.slot] for c in self.chunks]
        if self.all_logits:
            out["all_logits"] = True
        if self.copies:
            out["copies"] = [list(copy) for copy in self.copies]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> StepPlan:
        return cls(evict=obj.get("evict", []), uploads=[AdapterUpload(*u) for u in obj.get("uploads", [])],
                   free=obj.get("free", []), loads=[tuple(x) for x in obj.get("loads", [])],
                   chunks=[SeqChunk(*c) for c in obj.get("chunks", [])], all_logits=obj.get("all_logits", False),
                   copies=[tuple(x) for x in obj.get("copies", [])])

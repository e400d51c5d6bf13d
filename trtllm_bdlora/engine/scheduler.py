"""Rank 0's continuous batching: sequences join and leave between steps; prefill and decode share a step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.engine.requests import Request
from trtllm_bdlora.engine.sampler import sample


@dataclass
class Running:
    req: Request
    seq_id: int
    position: int = 0
    generator: torch.Generator | None = None
    stats: list[dict] = field(default_factory=list)


class Scheduler:
    def __init__(self, engine: Engine, max_batch_size: int = 16, collect_stats: bool = False):
        self.engine, self.max_batch_size, self.collect_stats = engine, max_batch_size, collect_stats
        self.waiting: deque[Request] = deque()
        self.running: list[Running] = []
        self._free: list[int] = []
        self._next_seq = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> list[Running]:
        admitted = []
        adapters = {r.req.adapter for r in self.running} - {None}
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            wanted = adapters | ({self.waiting[0].adapter} - {None})
            if len(wanted) > self.engine.pool.max_loras:
                break
            req = self.waiting.popleft()
            adapters = wanted
            gen = torch.Generator().manual_seed(req.seed) if req.temperature > 0 else None
            admitted.append(Running(req, self._next_seq, generator=gen))
            self._next_seq += 1
        return admitted

    def step(self) -> list[tuple[Request, list[dict]]]:
        """One engine step; returns the requests that finished in it (with their per-step stats)."""
        admitted = self._admit()
        batch = admitted + self.running
        loads, slots = self.engine.pool.assign([r.req.adapter for r in batch])
        chunks = [[r.seq_id, r.req.prompt_ids, 0, slot] for r, slot in zip(admitted, slots)]
        chunks += [[r.seq_id, [r.req.output_ids[-1]], r.position, slot]
                   for r, slot in zip(self.running, slots[len(admitted):])]
        plan = {"free": self._free, "loads": loads, "chunks": chunks}
        self._free = []
        log = self.engine.comm.log
        log.clear()
        logits = self.engine.lead(plan)
        step_stats = log.summary()
        finished = []
        self.running = []
        for r, row, (_, toks, start, _) in zip(batch, logits, plan["chunks"]):
            r.position = start + len(toks)
            token = sample(row, r.req.temperature, r.req.top_p, r.generator)
            r.req.output_ids.append(token)
            halt = r.req.on_token is not None and bool(r.req.on_token(token))  # a stop string, or the client left
            if self.collect_stats:
                r.stats.append(step_stats)
            if halt or token in self.engine.eos_ids or len(r.req.output_ids) >= r.req.max_tokens:
                self._free.append(r.seq_id)
                finished.append((r.req, r.stats))
            else:
                self.running.append(r)
        return finished

    def flush(self) -> None:
        """Free the KV caches of the last finished sequences on every rank."""
        if self._free:
            self.engine.lead({"free": self._free})
            self._free = []

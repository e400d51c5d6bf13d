"""Rank 0's continuous batching: sequences join and leave between steps; prefill and decode share a step."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.engine.requests import Request
from trtllm_bdlora.engine.sampler import ends_with, sample


@dataclass
class StepStats:
    """What the inflight-batcher metrics report: the last step's batch, and running totals."""

    iterations: int = 0
    context_requests: int = 0
    generation_requests: int = 0
    context_tokens: int = 0
    lora_collectives: int = 0
    slot_evictions: int = 0


@dataclass
class Running:
    req: Request
    seq_id: int
    end_ids: frozenset[int]
    position: int = 0
    generator: torch.Generator | None = None
    stats: list[dict] = field(default_factory=list)


def finish_reason(req: Request, token: int, end_ids: frozenset[int]) -> str | None:
    """Why a sequence ends after `token` (TensorRT-LLM's order: end id, stop words, length), or None."""
    if req.cancelled:
        return "cancelled"
    if token in end_ids:
        return "end_id"
    history = req.prompt_ids + req.output_ids
    if any(ends_with(history, word) for word in req.stop_words):
        return "stop_words"
    if len(req.output_ids) >= req.max_tokens:
        return "length"
    return None


class Scheduler:
    def __init__(self, engine: Engine, max_batch_size: int = 16, collect_stats: bool = False):
        self.engine, self.max_batch_size, self.collect_stats = engine, max_batch_size, collect_stats
        self.waiting: deque[Request] = deque()
        self.running: list[Running] = []
        self._free: list[int] = []
        self._next_seq = 0
        self.stats = StepStats()

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _drop_cancelled(self) -> list[tuple[Request, list[dict]]]:
        dropped = [req for req in self.waiting if req.cancelled]
        for req in dropped:
            self.waiting.remove(req)
            req.finish_reason = "cancelled"
        return [(req, []) for req in dropped]

    def _admit(self) -> list[Running]:
        admitted = []
        adapters = {r.req.adapter for r in self.running} - {None}
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            wanted = adapters | ({self.waiting[0].adapter} - {None})
            if len(wanted) > self.engine.pool.max_loras:
                break
            req = self.waiting.popleft()
            adapters = wanted
            gen = None if req.greedy else torch.Generator().manual_seed(req.seed)
            end_ids = frozenset(self.engine.eos_ids) if req.end_ids is None else req.end_ids
            req.times_ns.setdefault("first_scheduled", time.time_ns())
            admitted.append(Running(req, self._next_seq, end_ids, generator=gen))
            self._next_seq += 1
        return admitted

    def step(self) -> list[tuple[Request, list[dict]]]:
        """One engine step; returns the requests that finished in it (with their per-step stats)."""
        finished = self._drop_cancelled()
        admitted = self._admit()
        batch = admitted + self.running
        if not batch:
            return finished
        occupied = set(self.engine.pool.slot_of.values())
        loads, slots = self.engine.pool.assign([r.req.adapter for r in batch])
        self.stats.slot_evictions += sum(1 for slot, _ in loads if slot in occupied)
        chunks = [[r.seq_id, r.req.prompt_ids, 0, slot] for r, slot in zip(admitted, slots)]
        chunks += [[r.seq_id, [r.req.output_ids[-1]], r.position, slot]
                   for r, slot in zip(self.running, slots[len(admitted):])]
        plan = {"free": self._free, "loads": loads, "chunks": chunks}
        all_logits = any(r.req.return_context_logits for r in admitted)
        if all_logits:
            plan["all_logits"] = True
        self._free = []
        log = self.engine.comm.log
        log.clear()
        logits = self.engine.lead(plan)
        step_stats = log.summary()
        st = self.stats
        st.iterations += 1
        st.context_requests, st.generation_requests = len(admitted), len(self.running)
        st.context_tokens = sum(len(r.req.prompt_ids) for r in admitted)
        st.lora_collectives = log.count("lora")
        rows = self._last_rows(logits, plan["chunks"], admitted) if all_logits else logits
        self.running = []
        for r, row, (_, toks, start, _) in zip(batch, rows, plan["chunks"]):
            r.position = start + len(toks)
            self._sample_into(r, row)
            if self.collect_stats:
                r.stats.append(step_stats)
            reason = finish_reason(r.req, r.req.output_ids[-1], r.end_ids)
            r.req.finish_reason = reason  # set before on_token: a callback knows the token is the last one
            if r.req.on_token is not None:
                r.req.on_token(r.req.output_ids[-1])
            if reason is not None:
                self._free.append(r.seq_id)
                finished.append((r.req, r.stats))
            else:
                self.running.append(r)
        return finished

    @staticmethod
    def _last_rows(logits: torch.Tensor, chunks: list, admitted: list[Running]) -> list[torch.Tensor]:
        """Per-chunk last-token rows of an all-token logits tensor; keeps the prompt logits asked for."""
        rows, t = [], 0
        for i, (_, toks, _, _) in enumerate(chunks):
            if i < len(admitted) and admitted[i].req.return_context_logits:
                admitted[i].req.context_logits = logits[t : t + len(toks)].clone()
            t += len(toks)
            rows.append(logits[t - 1])
        return rows

    def _sample_into(self, r: Running, row: torch.Tensor) -> None:
        req = r.req
        token, logp = sample(row, req, r.generator, r.end_ids)
        now = time.time_ns()
        req.times_ns.setdefault("first_token", now)
        req.times_ns["last_token"] = now
        req.output_ids.append(token)
        if req.return_log_probs:
            req.output_log_probs.append(logp)
        if req.return_generation_logits:
            req.generation_logits.append(row.clone())

    def flush(self) -> None:
        """Free the KV caches of the last finished sequences on every rank."""
        if self._free:
            self.engine.lead({"free": self._free})
            self._free = []

"""Rank 0's continuous batching: sequences join and leave between steps; prefill and decode share a step.

Each step takes at most `max_num_tokens` tokens (TensorRT-LLM's name; vLLM's `max_num_batched_tokens`):
first one token for every decoding sequence, then prompt chunks of the sequences still in prefill in what is
left of the budget (chunked prefill, as TensorRT-LLM's chunked context and vLLM's chunked prefill; see
`plan_chunks` for the order). A long prompt is thus prefilled over several steps while the others keep decoding; the attention
of a chunk reads the KV cache of the earlier chunks, so the result is that of one whole prefill.

Prefix caching (vLLM's `--enable-prefix-caching`, on by default): a sequence's first chunk starts after the longest
prefix of its prompt that a sequence with the same adapter already holds in its KV cache (a shared system prompt or
chat template, an earlier turn of the conversation); every rank copies those positions' K and V (`StepPlan.copies`)
instead of computing them. Sources are the running sequences and up to `max_batch_size` finished ones, whose rows
stay in the cache (`CachedPrefix`) until a request needs the room (least recently used first), their adapter's
stored copy changes, or the work ends (`flush`), so requests that come one at a time share prefixes too.

A request is admitted only if the KV cache can hold it with the running ones at their longest (prompt plus
max_tokens each, `KVBudget.fits`); otherwise it waits, in order. One that could never fit, even alone, fails at
once with a one-line error.

Requests whose client has gone (`Request.cancelled` / `Request.client_gone`) leave at the start of the next
step, before any work is planned for them; their KV caches are freed in that step's plan. An exception
while handling one request's result (sampling, stop checks, its callback) fails that request alone; one
raised while planning fails the step's requests; one from the ranks' forward propagates (the ranks may
disagree about what ran: the runtime stops the server).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.engine.logprobs import position_logprobs, prompt_chunk_logprobs
from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
from trtllm_bdlora.engine.request import Request
from trtllm_bdlora.engine.sampler import ends_with, finite_rows, sample
from trtllm_bdlora.errors import BdLoraError, InternalError, RequestError, as_error, log_text

# vLLM's chunked-prefill default for online serving on a GPU (TensorRT-LLM builds use 8192); on a CPU a step of
# 2048 prompt tokens takes seconds even on a tiny model, which every decoding sequence would wait for
DEFAULT_MAX_NUM_TOKENS = {"cuda": 2048, "cpu": 256}


def default_max_num_tokens(device) -> int:
    return DEFAULT_MAX_NUM_TOKENS.get(getattr(device, "type", str(device)), DEFAULT_MAX_NUM_TOKENS["cpu"])
log = logging.getLogger("trtllm_bdlora.scheduler")


@dataclass
class StepStats:
    """What the inflight-batcher metrics report: the last step's batch, and running totals."""

    iterations: int = 0
    context_requests: int = 0
    generation_requests: int = 0
    context_tokens: int = 0
    lora_collectives: int = 0
    slot_evictions: int = 0
    prefix_query_tokens: int = 0  # prompt tokens of sequences that could reuse a prefix (vLLM's prefix cache queries)
    prefix_hit_tokens: int = 0  # of those, copied from another sequence instead of computed


@dataclass(frozen=True)
class CachedPrefix:
    """A finished sequence whose KV cache row is kept for prefix caching: the tokens it holds (prompt and output up
    to its position), computed with the stored copy `version` of `adapter` (`AdapterPool.version`)."""

    adapter: int | None
    version: int | None
    tokens: list[int]


@dataclass
class Running:
    req: Request
    seq_id: int
    end_ids: frozenset[int]
    position: int = 0  # tokens already in this sequence's KV cache
    generator: torch.Generator | None = None
    stats: list[dict] = field(default_factory=list)
    context_logits: list[torch.Tensor] = field(default_factory=list)  # per prefill chunk, when asked for

    @property
    def prefilling(self) -> bool:
        return self.position < len(self.req.prompt_ids)

    @property
    def kv_tokens(self) -> int:
        return kv_tokens(self.req)


def kv_tokens(req: Request) -> int:
    """The most KV cache a request can take: its prompt and every token it may generate."""
    return len(req.prompt_ids) + req.params.max_tokens


def wants_prompt_rows(req: Request) -> bool:
    """A prefill of this request needs the logits of every prompt token, not only the last."""
    return req.params.return_context_logits or req.params.prompt_logprobs is not None


def finish_reason(req: Request, token: int, end_ids: frozenset[int]) -> str | None:
    """Why a sequence ends after `token` (TensorRT-LLM's order: end id, stop words, length), or None."""
    if req.cancelled:
        return req.cancel_reason
    if token in end_ids:
        return "end_id"
    if req.guide_matcher is not None and req.guide_matcher.done:  # the grammar ended without an end token
        return "guide_done"
    history = req.prompt_ids + req.output_ids
    if any(ends_with(history, word) for word in req.params.stop_words):
        return "stop_words"
    if len(req.output_ids) >= req.params.max_tokens:
        return "length"
    return None


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def held_tokens(r: Running) -> list[int]:
    """The tokens whose K and V a sequence's cache row holds."""
    return (r.req.prompt_ids + r.req.output_ids)[: r.position]


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b):
        if x != y:
            break
        n += 1
    return n


def plan_chunks(running: list[Running], max_num_tokens: int) -> list[tuple[Running, list[int], int]]:
    """(sequence, tokens, start) for one step: every decoding sequence's last token, then prompt chunks while the
    token budget lasts, shortest remaining prompt first (a short request is not queued behind long prefills, as
    vLLM's partial-prefill limits intend), the oldest prompt in prefill always getting a quarter of the budget
    (so no prompt starves) and at least one token when nothing decodes."""
    step = [(r, [r.req.output_ids[-1]], r.position) for r in running if not r.prefilling]
    budget = max_num_tokens - len(step)
    oldest = next((r for r in running if r.prefilling), None)
    reserved = min(len(oldest.req.prompt_ids) - oldest.position, max(max_num_tokens // 4, 1)) if oldest else 0
    for r in sorted((r for r in running if r.prefilling), key=lambda r: len(r.req.prompt_ids) - r.position):
        room = budget if r is oldest else budget - reserved
        if room <= 0 and (step or r is not oldest):
            continue
        n = min(len(r.req.prompt_ids) - r.position, max(room, 1))
        step.append((r, r.req.prompt_ids[r.position : r.position + n], r.position))
        budget -= n
    return step


class Scheduler:
    def __init__(self, engine: Engine, max_batch_size: int = 16, collect_stats: bool = False,
                 max_num_tokens: int | None = None):
        self.engine, self.max_batch_size, self.collect_stats = engine, max_batch_size, collect_stats
        self.max_num_tokens = max_num_tokens or default_max_num_tokens(engine.comm.device)
        self.prefix_caching = getattr(engine, "prefix_caching", False)
        self.waiting: deque[Request] = deque()
        self.running: list[Running] = []
        self.cached: OrderedDict[int, CachedPrefix] = OrderedDict()  # seq id -> finished sequence kept, LRU first
        self._free: list[int] = []
        self._next_seq = 0
        self.stats = StepStats()

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _drop_abandoned(self) -> list[tuple[Request, list[dict]]]:
        """Cancelled requests, queued or running, leave now; a running one's KV cache is freed in this step."""
        dropped = [(req, []) for req in self.waiting if req.abandoned]
        for req, _ in dropped:
            self.waiting.remove(req)
        for r in [r for r in self.running if r.req.abandoned]:
            self.running.remove(r)
            self._free.append(r.seq_id)
            dropped.append((r.req, r.stats))
        for req, _ in dropped:
            req.finish_reason = req.cancel_reason
            log.debug("request %s cancelled after %d tokens", req.id, len(req.output_ids))
        return dropped

    def _admit(self) -> list[tuple[Request, list[dict]]]:
        """Move waiting requests into the batch while slots, adapters and the KV cache allow; returns those that
        can never fit the KV cache, failed."""
        refused = []
        adapters = {r.req.adapter for r in self.running} - {None}
        budget = self.engine.kv_budget
        lengths = [r.kv_tokens for r in self.running]
        while self.waiting and len(self.running) < self.max_batch_size:
            head = self.waiting[0]
            if not budget.fits([kv_tokens(head)]):
                self.waiting.popleft()
                head.error = RequestError(f"prompt of {len(head.prompt_ids)} tokens with max_tokens "
                                          f"{head.params.max_tokens} ({kv_tokens(head)} tokens) does not fit "
                                          f"{budget.describe()}", param="max_tokens")
                head.finish_reason = "error"
                log.error("request %s refused: %s", head.id, head.error)
                refused.append((head, []))
                continue
            wanted = adapters | ({head.adapter} - {None})
            if len(wanted) > self.engine.pool.max_loras or not budget.fits([*lengths, kv_tokens(head)]):
                break
            self._trim_cached([*lengths, kv_tokens(head)])
            req = self.waiting.popleft()
            lengths.append(kv_tokens(req))
            adapters = wanted
            gen = None if req.params.greedy else torch.Generator().manual_seed(req.params.seed)
            end_ids = frozenset(self.engine.eos_ids) if req.params.end_ids is None else req.params.end_ids
            req.times_ns.setdefault("first_scheduled", time.time_ns())
            self.running.append(Running(req, self._next_seq, end_ids, generator=gen))
            self._next_seq += 1
        return refused

    def _trim_cached(self, lengths: tuple[int, ...] | list[int] = ()) -> None:
        """Drop cached prefixes, least recently used first, until at most `max_batch_size` are left and they fit the
        KV cache beside sequences that reach `lengths`."""
        budget = self.engine.kv_budget
        while self.cached and (len(self.cached) > self.max_batch_size
                               or not budget.fits([*lengths, *(len(c.tokens) for c in self.cached.values())])):
            self._drop_cached(next(iter(self.cached)))

    def _drop_cached(self, seq_id: int) -> None:
        del self.cached[seq_id]
        self._free.append(seq_id)

    def _retire(self, r: Running) -> None:
        """A sequence finished: its row is kept as a cached prefix (the oldest beyond `max_batch_size` dropped), or
        freed."""
        if not self.prefix_caching:
            self._free.append(r.seq_id)
            return
        self.cached[r.seq_id] = CachedPrefix(r.req.adapter, self.engine.pool.version(r.req.adapter), held_tokens(r))
        self._trim_cached()

    def _fail(self, r: Running, error: BdLoraError, finished: list) -> None:
        """One request fails alone: it leaves the batch, its KV cache is freed, the others go on."""
        log.error("request %s failed: %s", r.req.id, log_text(error))
        r.req.error = error
        r.req.finish_reason = "error"
        if r in self.running:
            self.running.remove(r)
        self._free.append(r.seq_id)
        finished.append((r.req, r.stats))

    def step(self) -> list[tuple[Request, list[dict]]]:
        """One engine step; returns the requests that finished in it (with their per-step stats)."""
        finished = self._drop_abandoned()
        finished += self._admit()
        if not self.running:
            self.flush(keep_cached=True)  # the last sequences left: free their KV caches now, not in some later step
            return finished
        step: list[tuple[Running, list[int], int]] = []
        try:
            step = plan_chunks(self.running, self.max_num_tokens)
            copies = self._share_prefixes(step) if self.prefix_caching else []
            occupied = set(self.engine.pool.slot_of.values())
            loads, slots = self.engine.pool.assign([r.req.adapter for r, _, _ in step])
        except Exception as err:  # nothing was sent to the other ranks: only this step's requests fail
            for r in [r for r, _, _ in step] or list(self.running):
                self._fail(r, as_error(err, "internal error while scheduling"), finished)
            return finished
        self.stats.slot_evictions += sum(1 for slot, _ in loads if slot in occupied)
        all_logits = any(r.prefilling and wants_prompt_rows(r.req) for r, _, _ in step)
        plan = StepPlan(free=self._free, loads=loads, all_logits=all_logits, copies=copies,
                        chunks=[SeqChunk(r.seq_id, toks, start, slot) for (r, toks, start), slot in zip(step, slots)])
        self._free = []
        comm_log = self.engine.comm.log
        comm_log.clear()
        logits = self.engine.lead(plan)
        step_stats = comm_log.summary()
        self._count(step, comm_log.count("lora"))
        rows = self._last_rows(logits, step) if all_logits else logits
        for (r, toks, start), row in zip(step, rows):
            r.position = start + len(toks)
            if self.collect_stats:
                r.stats.append(step_stats)
            if r.prefilling:
                continue
            try:
                self._advance(r, row, finished)
            except Exception as err:
                self._fail(r, as_error(err, "internal error while serving this request"), finished)
        return finished

    def _share_prefixes(self, step: list) -> list[tuple[int, int, int]]:
        """Prefix caching: each new sequence's first chunk (in place in `step`) starts after the longest prefix of
        its prompt (all but its last token) that a running or cached sequence with the same adapter holds; returns
        the copies. A request asking for its prompt's logits or log-probs computes them all."""
        fresh = [i for i, (r, _, start) in enumerate(step) if not start and not wants_prompt_rows(r.req)]
        if not fresh:  # most steps: only decodes and later chunks
            return []
        for seq_id, c in list(self.cached.items()):
            if c.version != self.engine.pool.version(c.adapter):  # evicted, unloaded or stored again since
                self._drop_cached(seq_id)
        holders = [(h.seq_id, h.req.adapter, held_tokens(h)) for h in self.running if h.position > 0]
        holders += [(seq_id, c.adapter, c.tokens) for seq_id, c in self.cached.items()]
        copies = []
        for i in fresh:
            r, toks, _ = step[i]
            prompt = r.req.prompt_ids
            self.stats.prefix_query_tokens += len(prompt)
            source, n = None, 0
            for seq_id, adapter, tokens in holders:
                if adapter == r.req.adapter and (held := common_prefix(prompt, tokens, len(prompt) - 1)) > n:
                    source, n = seq_id, held
            if source is not None:
                step[i] = (r, prompt[n : n + len(toks)], n)
                copies.append((source, r.seq_id, n))
                self.stats.prefix_hit_tokens += n
                if source in self.cached:
                    self.cached.move_to_end(source)
        return copies

    def _count(self, step: list, lora_collectives: int) -> None:
        st = self.stats
        st.iterations += 1
        prefill = [toks for r, toks, start in step if start < len(r.req.prompt_ids)]
        st.context_requests, st.generation_requests = len(prefill), len(step) - len(prefill)
        st.context_tokens = sum(len(toks) for toks in prefill)
        st.lora_collectives = lora_collectives

    def _advance(self, r: Running, row: torch.Tensor, finished: list) -> None:
        """Sample one token for a sequence whose prompt is in its KV cache; finish it if it is done."""
        if r.context_logits:
            r.req.context_logits = torch.cat(r.context_logits)
            r.context_logits = []
        self._sample_into(r, row)
        reason = finish_reason(r.req, r.req.output_ids[-1], r.end_ids)
        r.req.finish_reason = reason  # set before on_token: a callback knows the token is the last one
        if r.req.on_token is not None:
            r.req.on_token(r.req.output_ids[-1])
            if reason is None and r.req.cancelled:  # the callback ended it (an OpenAI stop string)
                reason = r.req.finish_reason = r.req.cancel_reason
        if reason is not None:
            self.running.remove(r)
            self._retire(r)
            finished.append((r.req, r.stats))

    @staticmethod
    def _last_rows(logits: torch.Tensor, step: list) -> list[torch.Tensor]:
        """Per-chunk last-token rows of an all-token logits tensor; keeps the prompt logits and prompt log-probs
        asked for (the log-probs as a few numbers per position, not the rows)."""
        rows, t = [], 0
        for r, toks, start in step:
            if start < len(r.req.prompt_ids):
                params = r.req.params
                if params.return_context_logits:
                    r.context_logits.append(logits[t : t + len(toks)].clone())
                if params.prompt_logprobs is not None:
                    r.req.prompt_token_logprobs += prompt_chunk_logprobs(logits[t : t + len(toks)], r.req.prompt_ids,
                                                                         start, params.prompt_logprobs)
            t += len(toks)
            rows.append(logits[t - 1])
        return rows

    def _sample_into(self, r: Running, row: torch.Tensor) -> None:
        req = r.req
        if not bool(finite_rows(row)):
            raise InternalError("the model produced non-finite logits for this request"
                                     + (f" (adapter {req.adapter})" if req.adapter is not None else ""))
        allowed = req.guide_matcher.allowed() if req.guide_matcher is not None else None
        token, logp = sample(row, req, r.generator, r.end_ids, allowed)
        if req.guide_matcher is not None:
            req.guide_matcher.accept(token)
        if req.params.logprobs is not None:  # the model's own log-probs (engine/logprobs.py), not the sampler's
            req.output_token_logprobs += position_logprobs(row.unsqueeze(0), [token], req.params.logprobs)
        now = time.time_ns()
        req.times_ns.setdefault("first_token", now)
        req.times_ns["last_token"] = now
        req.output_ids.append(token)
        if req.params.return_log_probs:
            req.output_log_probs.append(logp)
        if req.params.return_generation_logits:
            req.generation_logits.append(row.clone())

    def flush(self, keep_cached: bool = False) -> None:
        """Free the KV caches of the last finished sequences on every rank, and the cached prefixes unless
        `keep_cached` (the work has ended)."""
        if not keep_cached:
            self._free += list(self.cached)
            self.cached.clear()
        if self._free:
            self.engine.lead(StepPlan(free=self._free))
            self._free = []

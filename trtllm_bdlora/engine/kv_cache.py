"""One rank's KV cache: preallocated rows of one shared capacity, sized from a byte budget.

Layout. Per layer, K and V are each one slab viewed as [rows, kv_heads, capacity, head_dim]; a running sequence
owns one row, and token t of it sits at [row, :, t]. `rows * capacity` never exceeds the budget's tokens, so when a
sequence outgrows the capacity, the capacity doubles and the number of rows halves (and the other way round when
more sequences must fit than there are rows). Moving to a new capacity copies each sequence's tokens once
(`_relayout`); a step never concatenates.

Why rows and not paged blocks. A step's decoding sequences all read their keys from ONE strided view of the slab,
`slab[lo:hi, :, :longest]`, so batched attention is a single SDPA call with no gather. With paged blocks, torch
(without a custom kernel) must first gather every sequence's blocks into a padded batch, which copies the whole
context at every layer of every step: measured on this CPU for smollm2-135m's shapes (8 sequences, 30 layers,
one thread), the gather alone cost more than the attention it feeds (12 against 10 ms at context 256, 48 against
34 ms at 1k, float32). The price of rows is internal fragmentation: every row is as long as the longest sequence
(rounded up to a power of two), so a mix of one long and many short requests admits fewer sequences than blocks
would. The budget caps the tokens the slab can hold; memory is taken from the OS only as it is written (an
anonymous mapping on CPU), so RSS follows the rows in use, not the budget.

Bookkeeping. No row table travels in the step plan: every rank applies the same plans in the same order, and
`begin_step` derives rows, lengths and capacity from them deterministically (lowest free row first, rows renumbered
in order on a relayout). Rank 0's scheduler keeps admission within the budget with `KVBudget.fits` (each request
reserves its prompt plus max_tokens, as TensorRT-LLM's GUARANTEED_NO_EVICT policy), so the lazily grown layout
always fits; a plan that does not fit (a caller that skipped admission) raises `KVCacheFullError` on every rank.
"""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass, field

import torch

from trtllm_bdlora.errors import BdLoraError

# Per rank; like vLLM's VLLM_CPU_KVCACHE_SPACE, a cap on what the cache may hold, not memory taken at start-up.
DEFAULT_KV_CACHE_BYTES = 4 << 30
MIN_CAPACITY = 16


class KVCacheFullError(BdLoraError):
    """A step's sequences do not fit the KV cache's budget (the scheduler's admission prevents this)."""


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token takes in one rank's cache: K and V of every layer."""
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class KVBudget:
    """How many tokens one rank's cache holds, and the longest sequence the engine serves."""

    tokens: int
    max_seq_len: int
    nbytes: int = 0  # the budget given, for messages

    @property
    def row_limit(self) -> int:
        return min(self.tokens, self.max_seq_len)

    def capacity_for(self, length: int) -> int:
        """Row capacity for sequences of up to `length` tokens: a power of two (at least MIN_CAPACITY), capped."""
        return min(max(next_power_of_two(length), MIN_CAPACITY), self.row_limit)

    def rows_for(self, capacity: int) -> int:
        return self.tokens // capacity if capacity else 0

    def fits(self, lengths: list[int]) -> bool:
        """Whether sequences that reach these lengths can all be held at once."""
        if not lengths:
            return True
        longest = max(lengths)
        return longest <= self.row_limit and len(lengths) <= self.rows_for(self.capacity_for(longest))

    def describe(self) -> str:
        size = f"--kv-cache-bytes {self.nbytes} per rank" if self.nbytes else "the cache's budget"
        return f"the KV cache of {self.tokens} tokens ({size})"


def budget_from_bytes(nbytes: int, bytes_per_token: int, max_seq_len: int) -> KVBudget:
    tokens = nbytes // bytes_per_token
    if tokens < MIN_CAPACITY:
        raise BdLoraError(f"--kv-cache-bytes {nbytes} holds {tokens} tokens per rank ({bytes_per_token} bytes each); "
                          f"at least {MIN_CAPACITY} are needed")
    return KVBudget(tokens, max_seq_len, nbytes)


def zeroed_storage(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat zero tensor. On CPU an anonymous mapping: zero pages, resident only once written."""
    if device.type != "cpu":
        return torch.zeros(numel, dtype=dtype, device=device)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buf, dtype=dtype, count=numel)


@dataclass
class DecodeRun:
    """Decoding tokens (chunks of one token) in consecutive cache rows lo..hi, ordered by row: one attention call
    whose keys are a view of those rows. Rows not decoding this step (kept prefixes, finished or prefilling
    sequences) split the decoding rows into runs, so no call reads them."""

    tokens: torch.Tensor  # [hi - lo] token indices, the token of row lo first
    lo: int
    hi: int
    keys: int  # the longest sequence of the run
    mask: torch.Tensor  # [hi - lo, 1, 1, keys]


def decode_runs(decoding: list[tuple[int, int, int]], device: torch.device) -> list[DecodeRun]:
    """The runs of consecutive cache rows among the decoding tokens `decoding` ((token, row, keys) each)."""
    runs: list[list[tuple[int, int, int]]] = []
    for entry in sorted(decoding, key=lambda e: e[1]):
        if not runs or runs[-1][-1][1] != entry[1] - 1:
            runs.append([])
        runs[-1].append(entry)
    out = []
    for run in runs:
        lengths = [keys for _, _, keys in run]
        longest = max(lengths)
        # a mask even where the lengths are equal: unmasked, SDPA takes its flash kernel, slower on this CPU for a
        # decode's few queries (1.64 against 1.38 ms for 8 rows of 1024 keys, one thread)
        mask = (torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
                ).view(len(run), 1, 1, longest)
        out.append(DecodeRun(torch.tensor([t for t, _, _ in run], device=device), run[0][1], run[-1][1] + 1, longest,
                             mask))
    return out


@dataclass
class StepLayout:
    """Where a step's tokens go in the cache and which rows its attention reads; built once per step, used by
    every layer. Token indices refer to the step's flattened [T] batch."""

    capacity: int
    write_index: torch.Tensor  # [T * kv_heads]: rows of the [rows * kv_heads * capacity, head_dim] view
    # every token as one query (kernels.avx2.cache_attention): its cache row and its keys (position + 1)
    token_index: torch.Tensor | None = None  # [T] 0..T-1
    token_rows: torch.Tensor | None = None  # [T]
    token_keys: torch.Tensor | None = None  # [T]
    # decoding tokens (chunks of one token): (token index, row, keys) each; their SDPA runs are built on first use,
    # so a step on the AVX2 kernel (which reads token_rows and token_keys) never builds them
    decoding: list[tuple[int, int, int]] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    # prefill chunks (more than one token): padded to [chunks, longest chunk]; the SDPA path's mask, too, is built
    # on first use
    prefill_tokens: torch.Tensor | None = None  # [m] token indices
    prefill_slots: torch.Tensor | None = None  # [m] chunk * longest chunk + offset in the chunk
    prefill_rows: torch.Tensor | None = None  # [chunks]
    prefill_queries: int = 0  # longest chunk
    prefill_keys: int = 0  # longest context
    prefill_last_key: torch.Tensor | None = None  # [chunks, longest chunk]: the last key each query sees
    group: int = 1  # query heads per KV head

    @functools.cached_property
    def decode(self) -> list[DecodeRun]:
        return decode_runs(self.decoding, self.device)

    @functools.cached_property
    def prefill_mask(self) -> torch.Tensor:
        """[chunks, 1, group * longest chunk, prefill_keys], for the SDPA path's grouped view, which puts a KV
        head's query heads one after another along the query axis."""
        chunks, longest = self.prefill_last_key.shape
        mask = torch.arange(self.prefill_keys, device=self.device)[None, None, :] <= self.prefill_last_key[:, :, None]
        return mask.unsqueeze(1).expand(chunks, self.group, longest, self.prefill_keys).reshape(
            chunks, 1, self.group * longest, self.prefill_keys)


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 budget: KVBudget):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device, self.budget = dtype, device, budget
        self.slab_numel = budget.tokens * kv_heads * head_dim
        self.storage = zeroed_storage(2 * num_layers * self.slab_numel, dtype, device).view(num_layers, 2, -1)
        self.capacity = 0
        self.rows: dict[int, int] = {}  # seq_id -> row
        self.lengths: dict[int, int] = {}  # seq_id -> tokens written
        self.dirty: set[int] = set()  # sequences whose cache may hold non-finite values: zeroed when freed

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.rows

    def __len__(self) -> int:
        """Sequences holding a row."""
        return len(self.rows)

    def view(self, layer: int, which: int, capacity: int | None = None) -> torch.Tensor:
        """K (which 0) or V (1) of a layer as [rows, kv_heads, capacity, head_dim]."""
        cap = capacity or self.capacity
        rows = self.budget.rows_for(cap)
        flat = self.storage[layer, which, : rows * self.kv_heads * cap * self.head_dim]
        return flat.view(rows, self.kv_heads, cap, self.head_dim)

    def free(self, seq_id: int) -> None:
        row = self.rows.pop(seq_id, None)
        self.lengths.pop(seq_id, None)
        if row is not None and seq_id in self.dirty:
            for layer in range(self.num_layers):
                for which in (0, 1):
                    self.view(layer, which)[row].zero_()
        self.dirty.discard(seq_id)

    def mark_dirty(self, seq_ids) -> None:
        self.dirty.update(s for s in seq_ids if s in self.rows)

    def _relayout(self, capacity: int) -> None:
        """Move every sequence's tokens to rows 0..n-1 (in their current row order) of the new capacity."""
        order = sorted(self.rows, key=self.rows.__getitem__)
        used = max((self.lengths.get(s, 0) for s in order), default=0)
        if order and used and self.capacity:
            src_rows = torch.tensor([self.rows[s] for s in order], device=self.device)
            for layer in range(self.num_layers):
                for which in (0, 1):
                    data = self.view(layer, which)[:, :, :used].index_select(0, src_rows)
                    self.view(layer, which, capacity)[: len(order), :, :used] = data
        self.capacity = capacity
        self.rows = {s: i for i, s in enumerate(order)}

    def _place(self, chunks) -> None:
        """Rows for the step's new sequences, and the capacity every sequence's end after the step needs."""
        lengths = dict(self.lengths)
        for c in chunks:
            lengths[c.seq_id] = c.start + len(c.tokens)
        new = [c.seq_id for c in chunks if c.seq_id not in self.rows]
        longest = max(lengths.values())
        if longest > self.capacity or len(lengths) > self.budget.rows_for(self.capacity):
            capacity = self.budget.capacity_for(longest)
            if longest > capacity or len(lengths) > self.budget.rows_for(capacity):
                raise KVCacheFullError(f"{len(lengths)} sequences of up to {longest} tokens do not fit "
                                       f"{self.budget.describe()}")
            self._relayout(capacity)
        taken = set(self.rows.values())
        free_rows = (r for r in range(self.budget.rows_for(self.capacity)) if r not in taken)
        for seq_id in new:
            self.rows[seq_id] = next(free_rows)
        self.lengths = lengths

    def begin_step(self, chunks, group: int, copies=()) -> StepLayout:
        """Place the step's sequences, copy the shared prefixes `copies` ((source, target, n): positions 0..n-1,
        prefix caching), and build the indices every layer's attention uses. `group` is the number of query heads
        per KV head."""
        written = dict(self.lengths)
        self._place(chunks)
        for source, target, n in copies:
            self._copy_prefix(source, target, n, written)
        dev, cap, nkv = self.device, self.capacity, self.kv_heads
        write, rows, keys, t0 = [], [], [], 0
        decode, prefill = [], []
        for c in chunks:
            n, row = len(c.tokens), self.rows[c.seq_id]
            base = row * nkv * cap + c.start
            write += [base + h * cap + i for i in range(n) for h in range(nkv)]
            rows += [row] * n
            keys += range(c.start + 1, c.start + n + 1)
            (decode if n == 1 else prefill).append((t0, c, row))
            t0 += n
        layout = StepLayout(cap, torch.tensor(write, device=dev), torch.arange(t0, device=dev),
                            torch.tensor(rows, device=dev), torch.tensor(keys, device=dev),
                            decoding=[(t, row, c.start + 1) for t, c, row in decode], device=dev)
        if prefill:
            self._prefill_layout(layout, prefill, group)
        return layout

    def _copy_prefix(self, source: int, target: int, n: int, written: dict[int, int]) -> None:
        if written.get(source, 0) < n or target in written or target not in self.rows:
            raise BdLoraError(f"prefix copy of {n} tokens from sequence {source} to {target}: the source holds "
                              f"{written.get(source, 0)}, the target must be new to this step")
        src, dst = self.rows[source], self.rows[target]
        for layer in range(self.num_layers):
            for which in (0, 1):
                view = self.view(layer, which)
                view[dst, :, :n] = view[src, :, :n]
        if source in self.dirty:
            self.dirty.add(target)

    def _prefill_layout(self, layout: StepLayout, prefill: list, group: int) -> None:
        dev = self.device
        longest = max(len(c.tokens) for _, c, _ in prefill)
        keys = max(c.start + len(c.tokens) for _, c, _ in prefill)
        tokens, slots, last_key = [], [], []
        for p, (t0, c, _) in enumerate(prefill):
            n = len(c.tokens)
            tokens += range(t0, t0 + n)
            slots += range(p * longest, p * longest + n)
            # query i of the chunk (position start + i) sees keys 0..start+i; padded queries see key 0 only
            last_key.append([c.start + i for i in range(n)] + [0] * (longest - n))
        layout.prefill_tokens = torch.tensor(tokens, device=dev)
        layout.prefill_slots = torch.tensor(slots, device=dev)
        layout.prefill_rows = torch.tensor([row for _, _, row in prefill], device=dev)
        layout.prefill_queries, layout.prefill_keys = longest, keys
        layout.prefill_last_key, layout.group = torch.tensor(last_key, device=dev), group

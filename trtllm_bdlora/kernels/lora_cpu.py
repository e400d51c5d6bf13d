"""The multi-adapter LoRA op for the torch backend off CUDA: batched over adapters, no Python loop per adapter.

Same contract as `kernels.lora_ref` (slot layouts, ranks, scales, tokens without adapter), with fp32
accumulation for low-precision inputs (converted to float32 at decode sizes; from NATIVE_MIN_TOKENS tokens on,
multiplied in their own dtype with h rounded to it once, as PEFT does); slot entries beyond a slot's rank are
ignored but must be finite.
On CPU a decode step's LoRA costs the adapter bytes it reads and the number of torch calls, not arithmetic, so
the op reads each used adapter once, only up to the largest rank loaded (w; slots are sized for max_lora_rank),
and keeps the number of calls small and independent of the number of adapters. Two strategies, by token count:

  dense    (T <= DENSE_MAX_TOKENS) every token against every slot 0..n-1: one GEMM on the stacked
           A [n*w, K], one multiply by the step's token-slot mask, and one GEMM that accumulates into
           y against B stacked as [n*w, M] with each slot's scale and rank mask folded in. n times the exact
           FLOPs, but 3 torch calls per output.
  grouped  tokens sorted by slot once per step; `torch._grouped_mm` multiplies each adapter's segment by its own
           factors: exact FLOPs, for prefill batches.

Two things are prepared once and reused: the token grouping (it depends only on the step's slot ids, so every
layer and module shares it; `token_groups` remembers the last slot-id tensor) and, per linear group, the stacked
factors (they change only when an adapter is loaded; keyed by the tensors' ids and version counters). The cached
copy of B, and of A when w is below the slot width, can double the adapter memory on this backend (triple in
bfloat16 / float16: a float32 copy for decode steps and one in the dtype for prefills).
`python benchmarks/cpu_lora_op.py` compares the strategies and the reference at the embedded model's shapes.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch

from trtllm_bdlora.kernels.cpu_features import onednn_fast

DENSE_MAX_TOKENS = 256  # dense measured faster than grouped up to here (benchmarks/cpu_lora_op.py)
# low-precision batches of this many tokens or more skip the float32 conversion (_native): smollm2's four linear
# groups, four bf16 adapters, per layer, 1 / 2 threads: 8 tokens 283 / 246 us converted against 496 / 454 native,
# 32 tokens 662 / 493 against 579 / 493, 160 tokens 2567 / 1695 against 1019 / 882 (2026-12-06, /tmp script)
NATIVE_MIN_TOKENS = 32
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class TokenGroups:
    """A step's tokens grouped by adapter slot (tokens with slot -1 belong to no group)."""

    num_slots: int  # n: slots 0..n-1 are spanned (highest used slot + 1)
    onehot: torch.Tensor  # [T, n, 1] float32: token t uses slot s
    order: torch.Tensor  # [Ta] indices of tokens with an adapter, sorted by slot (stable)
    sorted_slots: torch.Tensor  # [Ta] their slots
    ends: torch.Tensor  # [n] int32 cumulative segment ends in `order`
    _masks: dict = field(default_factory=dict)

    def mask(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, n*width]: 1 where column block s belongs to the token's slot."""
        key = (width, dtype)
        if key not in self._masks:
            self._masks[key] = self.onehot.to(dtype).expand(-1, -1, width).reshape(self.onehot.shape[0], -1)
        return self._masks[key]


_last: tuple[torch.Tensor, int, TokenGroups | None] | None = None


def token_groups(slot_ids: torch.Tensor) -> TokenGroups | None:
    """Groups of a step's `slot_ids` [T] (None when no token has an adapter). Remembers the last tensor it
    was given (holding it, so its identity cannot be reused), so every module of a step shares one grouping."""
    global _last
    version = -1 if slot_ids.is_inference() else slot_ids._version  # inference tensors carry no version counter
    last = _last  # one read: another thread may replace it
    if last is not None and last[0] is slot_ids and last[1] == version:
        return last[2]
    groups = _group(slot_ids)
    _last = (slot_ids, version, groups)
    return groups


def _group(slot_ids: torch.Tensor) -> TokenGroups | None:
    n = int(slot_ids.max()) + 1 if slot_ids.numel() else 0
    if n <= 0:
        return None
    onehot = (slot_ids[:, None] == torch.arange(n, device=slot_ids.device)[None, :]).float()[:, :, None]
    has = (slot_ids >= 0).nonzero()[:, 0]
    order = has[torch.argsort(slot_ids[has], stable=True)]
    sorted_slots = slot_ids[order]
    ends = torch.cumsum(torch.bincount(sorted_slots, minlength=n), 0).to(torch.int32)
    return TokenGroups(n, onehot, order, sorted_slots, ends)


class _Prepared:
    """Per-slot constants of one (A, B, ranks, scales) slot set for the split shrink / expand (the `slora` path),
    in the compute dtype, valid while the tensors' version counters stay the same (a load writes in place)."""

    def __init__(self, a, b, ranks, scales, width: int, dtype: torch.dtype, versions: tuple | None):
        self.versions = versions
        keep = (torch.arange(width, device=ranks.device)[None, :] < ranks[:, None]).to(dtype)
        self.keep = keep if scales is None else keep * scales[:, None].to(dtype)  # [S, width]
        self.width = width
        # A stacked [S*R, K] (a view unless widened); B stacked [S*R, M] with keep folded in
        self.a_rows = None if a is None else a.to(dtype).reshape(-1, a.shape[2])
        self.b_rows = None if b is None else _b_rows(b, self.keep)
        self._per_n: dict = {}

    def for_slots(self, n: int) -> tuple:
        """(A^T [K, n*R], B rows [n*R, M]) of slots 0..n-1: views."""
        if n not in self._per_n:
            rows = n * self.width
            self._per_n[n] = (None if self.a_rows is None else self.a_rows[:rows].t(),
                              None if self.b_rows is None else self.b_rows[:rows])
        return self._per_n[n]


def _b_rows(b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """B [S, M, R_b] -> rows [S*w, M] of its first w = keep.shape[1] columns, each slot's row s*w+c scaled by keep[s, c]."""
    w = keep.shape[1]
    return (b[:, :, :w].to(keep.dtype) * keep[:, None, :]).transpose(1, 2).reshape(-1, b.shape[1])


class _Group:
    """Constants of one linear group's slot sets (the outputs that share an input, as q|k|v), in the compute dtype,
    looked up once per group: per output, A as rows [S*w, K] and B as rows [S*w, M] with each slot's scale and rank
    mask folded in. w is the largest rank loaded in any slot of the group: slots are sized for max_lora_rank,
    adapters rarely are, and the columns beyond w are never read (A is a view when nothing is trimmed or
    converted). Valid while the tensors' version counters stay the same (an adapter load writes in place)."""

    def __init__(self, a_slots, b_slots, ranks, scales, dtype: torch.dtype, versions: tuple | None):
        self.versions = versions
        used = max(int(r.max()) for r in ranks) if ranks[0].numel() else 0
        w = self.width = max(1, min(a_slots[0].shape[1], used))
        self.a_rows = [a[:, :w].to(dtype).reshape(-1, a.shape[2]) for a in a_slots]
        cols = torch.arange(w, device=ranks[0].device)[None, :]
        self.b_rows = [_b_rows(b, (cols < r[:, None]).to(dtype) * sc[:, None].to(dtype))
                       for b, r, sc in zip(b_slots, ranks, scales)]
        self._dense: dict = {}

    def dense(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per output (A^T [K, n*w], B rows [n*w, M]) of slots 0..n-1: views."""
        if n not in self._dense:
            rows = n * self.width
            self._dense[n] = [(a[:rows].t(), b[:rows]) for a, b in zip(self.a_rows, self.b_rows)]
        return self._dense[n]

    def grouped(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per output (A^T [n, K, w], B rows [n, w, M]) of slots 0..n-1, for torch._grouped_mm: views."""
        w = self.width
        return [(a.view(-1, w, a.shape[1])[:n].transpose(1, 2), b.view(-1, w, b.shape[1])[:n])
                for a, b in zip(self.a_rows, self.b_rows)]


_prepared: dict = {}  # ids of the tensors (and dtype) -> _Prepared / _Group, dropped when one of them is freed


def _versions(tensors) -> tuple | None:
    """Version counters of the tensors (None entries skipped); None if one cannot tell (inference tensors)."""
    try:
        return tuple([t._version for t in tensors if t is not None])
    except RuntimeError:  # an inference tensor: it carries no version counter
        return None


def _cached(key: tuple, tensors: tuple, build):
    """The cached constants under `key` while `tensors` keep their version counters, else a fresh `build(versions)`
    (cached unless the versions cannot be read). Ids are unique among live tensors, and an entry dies with its
    tensors."""
    versions = _versions(tensors)
    p = _prepared.get(key)
    if p is not None and versions is not None and p.versions == versions:
        return p
    p = build(versions)
    if versions is not None:
        if key not in _prepared:
            for t in tensors:
                if t is not None:
                    weakref.finalize(t, _prepared.pop, key, None)
        _prepared[key] = p
    return p


def _prepare(a, b, ranks, scales, width: int, dtype: torch.dtype) -> _Prepared:
    tensors = (a, b, ranks, scales)
    return _cached((*map(id, tensors), width, dtype), tensors,
                   lambda v: _Prepared(a, b, ranks, scales, width, dtype, v))


def _group_constants(a_slots, b_slots, ranks, scales, dtype: torch.dtype) -> _Group:
    tensors = (*a_slots, *b_slots, *ranks, *scales)
    return _cached((*map(id, tensors), dtype), tensors, lambda v: _Group(a_slots, b_slots, ranks, scales, dtype, v))


STRATEGY = os.environ.get("TRTLLM_BDLORA_CPU_OP", "auto")  # dense | grouped | auto


_GROUPED_DTYPES = (torch.float32, *_LOW_PRECISION) if hasattr(torch, "_grouped_mm") else ()


def _strategy(t: torch.Tensor) -> str:
    """STRATEGY (env TRTLLM_BDLORA_CPU_OP=dense|grouped) forces one; grouped needs a CPU float32/16 or bf16 tensor."""
    if STRATEGY == "dense" or t.dtype not in _GROUPED_DTYPES or t.device.type != "cpu":
        return "dense"
    if STRATEGY == "grouped":
        return "grouped"
    return "dense" if t.shape[0] <= DENSE_MAX_TOKENS else "grouped"


def _native(x: torch.Tensor) -> bool:
    """Whether a low-precision batch is multiplied in its own dtype (oneDNN: AMX / AVX-512 BF16, fp32
    accumulation, h rounded once to the dtype as PEFT rounds it) instead of converted to float32 (MKL). oneDNN's
    low-precision GEMMs cost some 20 us a call whatever their size, MKL's float32 ones 5-10 us at decode sizes, so
    only a batch of NATIVE_MIN_TOKENS or more (a prefill) goes native, where its arithmetic dominates; and only
    where oneDNN has native kernels for the dtype (not on an AVX2 CPU, where float32 is much faster)."""
    return (x.dtype in _LOW_PRECISION and x.shape[0] >= NATIVE_MIN_TOKENS and x.device.type == "cpu"
            and onednn_fast(x.dtype))


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _LOW_PRECISION else t


def _grouped(t: torch.Tensor, w: torch.Tensor, g: TokenGroups) -> torch.Tensor:
    """Rows of `t` (sorted by slot) times the transposed factor of their slot: w [S, out, in] -> [Ta, out]."""
    return torch._grouped_mm(t, _compute(w[: g.num_slots]).transpose(1, 2), offs=g.ends)


def _accumulate(y: torch.Tensor, off: int, delta: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """y[rows, off:off+M] += delta (all rows when `rows` is None), rounding once to y's dtype."""
    out = y[:, off : off + delta.shape[1]]
    if rows is not None:
        out.index_add_(0, rows, delta.to(y.dtype))
    elif delta.dtype == y.dtype:
        out.add_(delta)
    else:
        out.copy_(out.float() + delta)


def multi_lora_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    a_slots: list[torch.Tensor],
    b_slots: list[torch.Tensor],
    ranks: list[torch.Tensor],
    scales: list[torch.Tensor],
    out_offsets: list[int],
) -> torch.Tensor:
    """Same contract as kernels.lora_ref.multi_lora_ref: y[:, off:off+M] += LoRA terms, in place; returns y."""
    g = token_groups(slot_ids)
    if g is None:
        return y
    xc = x if _native(x) else _compute(x)
    grp = _group_constants(a_slots, b_slots, ranks, scales, xc.dtype)
    if _strategy(xc) == "dense":
        mask, same_dtype = g.mask(grp.width, xc.dtype), y.dtype == xc.dtype
        for (a_t, b_rows), off in zip(grp.dense(g.num_slots), out_offsets):
            h = torch.mm(xc, a_t).mul_(mask)
            if same_dtype:
                y.narrow(1, off, b_rows.shape[1]).addmm_(h, b_rows)
            else:
                _accumulate(y, off, torch.mm(h, b_rows))
        return y
    xs = xc[g.order]
    for (a_t, b_rows), off in zip(grp.grouped(g.num_slots), out_offsets):
        h = torch._grouped_mm(xs, a_t, offs=g.ends)  # [Ta, w]
        _accumulate(y, off, torch._grouped_mm(h, b_rows, offs=g.ends), g.order)
    return y


def lora_shrink_cpu(x: torch.Tensor, a_slots: torch.Tensor, slot_ids: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.lora_ref.lora_shrink_ref: h [T, R], zero beyond rank and for tokens without adapter."""
    g = token_groups(slot_ids)
    xc, width = _compute(x), a_slots.shape[1]
    if g is None:
        return xc.new_zeros(x.shape[0], width)
    p = _prepare(a_slots, None, ranks, None, width, xc.dtype)
    if _strategy(xc) == "dense":
        h = torch.mm(xc, p.for_slots(g.num_slots)[0]).view(x.shape[0], g.num_slots, width)
        return h.mul_(g.onehot * p.keep[: g.num_slots]).sum(1)
    hs = _grouped(xc[g.order], a_slots, g).mul_(p.keep[g.sorted_slots])
    return xc.new_zeros(x.shape[0], width).index_copy_(0, g.order, hs)


def lora_expand_cpu(
    y: torch.Tensor,
    h: torch.Tensor,
    b_slots: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    out_offset: int = 0,
) -> torch.Tensor:
    """Same contract as kernels.lora_ref.lora_expand_ref: y[:, off:off+M] += scale[s] * h[:, :rank] @ B[s]^T."""
    g = token_groups(slot_ids)
    if g is None:
        return y
    hc, width = _compute(h), h.shape[1]
    p = _prepare(None, b_slots, ranks, scales, width, hc.dtype)
    if _strategy(hc) == "dense":
        hm = hc.repeat(1, g.num_slots).mul_(g.mask(width, hc.dtype))
        _accumulate(y, out_offset, torch.mm(hm, p.for_slots(g.num_slots)[1]))
        return y
    hs = hc[g.order] * p.keep[g.sorted_slots]
    _accumulate(y, out_offset, _grouped(hs, b_slots[:, :, :width], g), g.order)
    return y

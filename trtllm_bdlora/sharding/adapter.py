"""Per-rank slices of one module's LoRA under the three TP schemes (docs/architecture.md, the scheme table).

Every rank computes `h = x_local @ a^T`, optionally a collective on h, then `scaling * h @ b^T`:

| scheme     | column (q,k,v,gate,up)                | row (o,down)                                  |
|------------|---------------------------------------|-----------------------------------------------|
| replicated | A whole, B out-slice                  | A in-slice, B whole                           |
| slora      | A rank-slice, all-gather h, B out-slice | A in-slice, all-reduce h, B out-chunk at offset |
| bdlora     | A rank-slice, B diagonal block        | A diagonal block, B rank-slice                |

Row outputs are partial sums added before the base model's own all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trtllm_bdlora.adapters.lora import Adapter, LoraFactors, block_misfit
from trtllm_bdlora.sharding.base import TPLayout

Scheme = Literal["bdlora", "slora", "replicated"]
SCHEMES: tuple[Scheme, ...] = ("bdlora", "slora", "replicated")
Collective = Literal["none", "all_gather", "all_reduce"]


@dataclass(frozen=True)
class LoraShard:
    """A rank's share of one module: y_local[:, out_offset:out_offset+b.shape[0]] += scaling * coll(x @ a^T) @ b^T."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    scheme: Scheme
    collective: Collective = "none"
    out_offset: int = 0

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def num_params(self) -> int:
        return self.a.numel() + self.b.numel()



def bd_misfit(f: LoraFactors, name: str, layout: TPLayout) -> str | None:
    """Why this module's factors cannot be served block-diagonally at this TP, or None if they can."""
    if why := block_misfit(f, layout.world):
        return why
    if name in ("k_proj", "v_proj") and layout.kv_replicated and layout.world > 1:
        return f"KV heads are replicated at tp={layout.world} (num_key_value_heads={layout.shape.num_kv_heads})"
    return None


def _rank_slice(total: int, world: int, rank: int) -> slice:
    size = total // world
    return slice(rank * size, (rank + 1) * size)


def _pad_rank(a: torch.Tensor, b: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = -a.shape[0] % world
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return a, b


def _shard_bdlora(f: LoraFactors, name: str, layout: TPLayout, rank: int) -> LoraShard:
    groups = f.nblocks // layout.world
    r_slice = _rank_slice(f.rank, layout.world, rank)
    if f.role == "column":
        b_rows = f.b[layout.out_slice(name, rank)]
        b = torch.block_diag(*b_rows.chunk(groups, dim=0))
        return LoraShard(f.a[r_slice], b, f.scaling, "bdlora")
    a = torch.block_diag(*f.a[r_slice].chunk(groups, dim=0))
    return LoraShard(a, f.b[:, r_slice], f.scaling, "bdlora")


def shard_lora(f: LoraFactors, name: str, layout: TPLayout, rank: int, scheme: Scheme) -> LoraShard:
    """Rank `rank`'s share of one module. `bdlora` falls back to `replicated` where bd_misfit says so."""
    if scheme == "bdlora":
        if bd_misfit(f, name, layout) is None:
            return _shard_bdlora(f, name, layout, rank)
        scheme = "replicated"
    a, b = f.dense_a(), f.dense_b()
    if f.role == "column":
        out = layout.out_slice(name, rank)
        if scheme == "replicated":
            return LoraShard(a, b[out], f.scaling, scheme)
        a, b = _pad_rank(a, b, layout.world)
        return LoraShard(a[_rank_slice(a.shape[0], layout.world, rank)], b[out], f.scaling, scheme, "all_gather")
    inp = layout.in_slice(name, rank)
    if scheme == "replicated":
        return LoraShard(a[:, inp], b, f.scaling, scheme)
    chunks = torch.tensor_split(torch.arange(b.shape[0]), layout.world)
    offset = int(chunks[rank][0]) if len(chunks[rank]) else 0
    return LoraShard(a[:, inp], b[chunks[rank]], f.scaling, scheme, "all_reduce", offset)


def shard_adapter(
    adapter: Adapter, layout: TPLayout, rank: int, scheme: Scheme
) -> dict[tuple[int, str], LoraShard]:
    return {key: shard_lora(f, key[1], layout, rank, scheme) for key, f in adapter.modules.items()}

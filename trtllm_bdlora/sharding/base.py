"""Megatron tensor-parallel layout of the Llama base weights.

q/k/v/gate/up are column-parallel (output rows split), o/down row-parallel (input columns split).
KV heads are split when TP divides them, and replicated (each rank keeps the one KV head its
query heads use) when TP exceeds them. Embedding, norms and lm_head are stored replicated (the embedding needs every
row, and tied weights are one tensor); the engine computes the logits vocabulary-parallel (`vocab_shard`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from trtllm_bdlora.errors import ModelError
from trtllm_bdlora.llama.shape import COLUMN_MODULES, ROW_MODULES, LlamaShape, check_tp

_LINEAR_KEY = re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.weight$")


@dataclass(frozen=True)
class TPLayout:
    shape: LlamaShape
    world: int

    @property
    def kv_replicated(self) -> bool:
        return self.world > self.shape.num_kv_heads

    @property
    def local_heads(self) -> int:
        return self.shape.num_heads // self.world

    @property
    def local_kv_heads(self) -> int:
        return 1 if self.kv_replicated else self.shape.num_kv_heads // self.world

    def kv_head_start(self, rank: int) -> int:
        if self.kv_replicated:
            return rank // (self.world // self.shape.num_kv_heads)
        return rank * self.local_kv_heads

    def out_slice(self, name: str, rank: int) -> slice:
        """Rows of a column-parallel module's weight (its output features) held by `rank`."""
        if name in ("k_proj", "v_proj"):
            hd = self.shape.head_dim
            start = self.kv_head_start(rank) * hd
            return slice(start, start + self.local_kv_heads * hd)
        _, out = self.shape.module_dims(name)
        size = out // self.world
        return slice(rank * size, (rank + 1) * size)

    def in_slice(self, name: str, rank: int) -> slice:
        """Columns of a row-parallel module's weight (its input features) held by `rank`."""
        inp, _ = self.shape.module_dims(name)
        size = inp // self.world
        return slice(rank * size, (rank + 1) * size)


def make_layout(shape: LlamaShape, world: int) -> TPLayout:
    """Validate that `world` ranks can shard this model; raises ModelError naming the conflict."""
    check_tp(shape, world)
    return TPLayout(shape, world)


def vocab_shard(lm_head: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s rows of the LM head [vocab, hidden]: ceil(vocab / world) consecutive rows, the last rank's
    padded with zero rows, so that the ranks' logits laid side by side are the whole vocabulary, then padding."""
    per = -(-lm_head.shape[0] // world)
    rows = lm_head[rank * per : (rank + 1) * per]
    if rows.shape[0] < per:
        rows = torch.cat([rows, rows.new_zeros(per - rows.shape[0], lm_head.shape[1])])
    return rows.contiguous()


def shard_llama_state_dict(
    state_dict: dict[str, torch.Tensor], layout: TPLayout, rank: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice of an HF LlamaForCausalLM state dict (keys unchanged)."""
    out = {}
    for key, tensor in state_dict.items():
        match = _LINEAR_KEY.match(key)
        name = match[1] if match else None
        if name in COLUMN_MODULES:
            tensor = tensor[layout.out_slice(name, rank)]
        elif name in ROW_MODULES:
            tensor = tensor[:, layout.in_slice(name, rank)]
        elif key.endswith(".bias") and ("proj" in key):
            raise ModelError(f"{key}: biased Llama projections are not supported")
        out[key] = tensor.contiguous()
    return out

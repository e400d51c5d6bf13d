"""The dimensions of a Llama decoder that adapters and sharding are checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trtllm_bdlora.errors import ModelError

Role = Literal["column", "row"]

COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_MODULES = ("o_proj", "down_proj")
LLAMA_MODULES = COLUMN_MODULES + ROW_MODULES
MODULE_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


# the linear groups of a decoder layer as the engine fuses them (one GEMM and one LoRA site each)
LINEAR_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                 "down": ("down_proj",)}


def module_role(name: str) -> Role:
    return "column" if name in COLUMN_MODULES else "row"


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0

    @classmethod
    def from_config(cls, config) -> LlamaShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
        )

    def module_dims(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a Llama linear module."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[name]


def check_tp(shape: LlamaShape, world: int, name: str = "tp") -> None:
    """Refuse a TP that cannot shard this model, naming the conflict (and the TP as `name`)."""
    if world < 1:
        raise ModelError(f"{name} must be >= 1, got {world}")
    if shape.num_heads % world:
        raise ModelError(f"{name} {world} does not divide num_attention_heads={shape.num_heads}")
    kv = shape.num_kv_heads
    if world <= kv and kv % world:
        raise ModelError(f"{name} {world} does not divide num_key_value_heads={kv}")
    if world > kv and world % kv:
        raise ModelError(f"{name} {world} exceeds num_key_value_heads={kv} and is not a multiple of it")
    if shape.intermediate_size % world:
        raise ModelError(f"{name} {world} does not divide intermediate_size={shape.intermediate_size}")


def shape_from_adapter(adapter) -> LlamaShape:
    """A stand-in shape read off an adapter's own dimensions, one 'head' per feature: KV-head
    replication cannot be seen without the base model."""
    dims = {name: (f.in_features, f.out_features) for (_, name), f in adapter.modules.items()}

    def dim(candidates: list[tuple[str, int]], default: int) -> int:
        return next((dims[n][i] for n, i in candidates if n in dims), default)

    col_in = [(n, 0) for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    hidden = dim(col_in + [("o_proj", 1), ("down_proj", 1)], 1)
    q_out = dim([("q_proj", 1), ("o_proj", 0)], hidden)
    kv_out = dim([("k_proj", 1), ("v_proj", 1)], q_out)
    inter = dim([("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)], hidden)
    return LlamaShape(hidden, inter, adapter.num_layers, q_out, kv_out, 1)

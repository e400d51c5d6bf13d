"""The canonical in-memory form of an adapter: per layer and module, A, B, scaling and block structure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from trtllm_bdlora.llama.shape import Role

BdFactor = Literal["A", "B"] | None


def block_diag_dense(stacked: torch.Tensor, nblocks: int) -> torch.Tensor:
    """PEFT's stacked block-diagonal weight (out, in/nb) as the dense (out, in) matrix."""
    return torch.block_diag(*stacked.chunk(nblocks, dim=0))


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: y += scaling * x @ A^T @ B^T.

    `a` is (r, in) and `b` is (out, r), except the block-diagonal factor, stored stacked as PEFT
    stores it: A as (r, in/nblocks) when bd_factor == "A", B as (out, r/nblocks) when "B".
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    role: Role
    bd_factor: BdFactor = None
    nblocks: int = 1

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1] * (self.nblocks if self.bd_factor == "A" else 1)

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    def dense_a(self) -> torch.Tensor:
        return block_diag_dense(self.a, self.nblocks) if self.bd_factor == "A" else self.a

    def dense_b(self) -> torch.Tensor:
        return block_diag_dense(self.b, self.nblocks) if self.bd_factor == "B" else self.b

    def delta(self) -> torch.Tensor:
        """The dense (out, in) weight delta, scaling included."""
        return self.scaling * (self.dense_b() @ self.dense_a())

    def num_params(self) -> int:
        return self.a.numel() + self.b.numel()


def block_misfit(f: LoraFactors, world: int) -> str | None:
    """Why these factors' blocks cannot give each of `world` ranks its own blocks, or None if they can."""
    want = "B" if f.role == "column" else "A"
    if f.bd_factor is None:
        return "plain LoRA factor (no block structure)"
    if f.bd_factor != want:
        return f"block-diagonal {f.bd_factor} on a {f.role}-parallel module (needs block-diagonal {want})"
    if f.nblocks % world:
        return f"nblocks={f.nblocks} is not a multiple of tp={world}"
    return None


@dataclass
class Adapter:
    """A loaded, validated adapter. `modules` maps (layer, module name) to its factors."""

    path: str
    kind: Literal["lora", "bdlora"]
    rank: int
    nblocks: int
    modules: dict[tuple[int, str], LoraFactors] = field(default_factory=dict)
    base_model: str | None = None
    stored_dtype: torch.dtype = torch.float32

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in self.modules})

    @property
    def num_layers(self) -> int:
        return 1 + max((layer for layer, _ in self.modules), default=-1)

    def num_params(self) -> int:
        return sum(f.num_params() for f in self.modules.values())

    def to(self, dtype: torch.dtype) -> Adapter:
        modules = {
            key: LoraFactors(f.a.to(dtype), f.b.to(dtype), f.scaling, f.role, f.bd_factor, f.nblocks)
            for key, f in self.modules.items()
        }
        return Adapter(self.path, self.kind, self.rank, self.nblocks, modules, self.base_model, self.stored_dtype)


def adapter_to_wire(adapter: Adapter) -> tuple[dict, torch.Tensor]:
    """A JSON-serialisable description and one flat float32 tensor holding every factor: how rank 0 sends an
    adapter it loaded to the other ranks (JSON and raw tensors, never pickle)."""
    modules = [[layer, name, list(f.a.shape), list(f.b.shape), f.scaling, f.role, f.bd_factor, f.nblocks]
               for (layer, name), f in adapter.modules.items()]
    flat = torch.cat([t.reshape(-1).to(torch.float32) for f in adapter.modules.values() for t in (f.a, f.b)])
    meta = {"path": adapter.path, "kind": adapter.kind, "rank": adapter.rank, "nblocks": adapter.nblocks,
            "base_model": adapter.base_model, "stored_dtype": str(adapter.stored_dtype).removeprefix("torch."),
            "modules": modules, "numel": flat.numel()}
    return meta, flat


def adapter_from_wire(meta: dict, flat: torch.Tensor) -> Adapter:
    """The inverse of `adapter_to_wire`."""
    modules, offset = {}, 0
    for layer, name, a_shape, b_shape, scaling, role, bd_factor, nblocks in meta["modules"]:
        a_size, b_size = a_shape[0] * a_shape[1], b_shape[0] * b_shape[1]
        a = flat[offset : offset + a_size].view(a_shape).clone()
        b = flat[offset + a_size : offset + a_size + b_size].view(b_shape).clone()
        offset += a_size + b_size
        modules[(layer, name)] = LoraFactors(a, b, scaling, role, bd_factor, nblocks)
    return Adapter(meta["path"], meta["kind"], meta["rank"], meta["nblocks"], modules, meta["base_model"],
                   getattr(torch, meta["stored_dtype"]))

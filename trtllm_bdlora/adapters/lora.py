"""The canonical in-memory form of an adapter: per layer and module, A, B, scaling and block structure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from trtllm_bdlora.models.shape import Role

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

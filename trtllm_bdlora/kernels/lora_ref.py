"""Torch reference of the multi-adapter LoRA op (docs/architecture.md): the oracle every kernel is tested against.

Layouts (those of PEFT and TensorRT-LLM): `a_slots [S, R, K]`, `b_slots [S, M, R]`, `ranks [S]`,
`scales [S]`, `slot_ids [T]` with -1 for tokens without adapter. For token t with s = slot_ids[t]:
    y[t, off:off+M] += scales[s] * (x[t] @ a_slots[s, :ranks[s]].T) @ b_slots[s, :, :ranks[s]].T
Several outputs (fused q|k|v, gate|up) share x: one (a, b, ranks, scales, offset) per output.
"""

from __future__ import annotations

import torch


def lora_shrink_ref(x: torch.Tensor, a_slots: torch.Tensor, slot_ids: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """h [T, R] = x @ A[s]^T, zero beyond each adapter's rank and for tokens without adapter."""
    h = x.new_zeros(x.shape[0], a_slots.shape[1])
    for s in torch.unique(slot_ids).tolist():
        if s < 0:
            continue
        rows = (slot_ids == s).nonzero(as_tuple=True)[0]
        r = int(ranks[s])
        h[rows, :r] = x[rows] @ a_slots[s, :r].T
    return h


def lora_expand_ref(
    y: torch.Tensor,
    h: torch.Tensor,
    b_slots: torch.Tensor,
    slot_ids: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    out_offset: int = 0,
) -> torch.Tensor:
    """y[:, off:off+M] += scale[s] * h[:, :rank[s]] @ B[s][:, :rank[s]]^T, in place; returns y."""
    m = b_slots.shape[1]
    for s in torch.unique(slot_ids).tolist():
        if s < 0:
            continue
        rows = (slot_ids == s).nonzero(as_tuple=True)[0]
        r = int(ranks[s])
        delta = (h[rows, :r].float() @ b_slots[s, :, :r].T.float()) * float(scales[s])
        y[rows, out_offset : out_offset + m] += delta.to(y.dtype)
    return y


def multi_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    a_slots: list[torch.Tensor],
    b_slots: list[torch.Tensor],
    ranks: list[torch.Tensor],
    scales: list[torch.Tensor],
    out_offsets: list[int],
) -> torch.Tensor:
    """The fused op for one or more outputs; fp32 accumulation for low-precision inputs."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    for a, b, r, sc, off in zip(a_slots, b_slots, ranks, scales, out_offsets):
        h = lora_shrink_ref(xf, a.to(xf.dtype), slot_ids, r)
        lora_expand_ref(y, h, b, slot_ids, r, sc, off)
    return y

"""The LoRA site of one linear group (fused q|k|v, o, fused gate|up, down) on one rank.

Dispatches the multi-adapter op to the Triton kernel on CUDA and to the torch reference
elsewhere; under `slora` it splits into shrink, collective, expand.
"""

from __future__ import annotations

import os

import torch

from trtllm_bdlora.engine.adapter_pool import ModuleSlots
from trtllm_bdlora.engine.comm import Comm
from trtllm_bdlora.kernels.lora_ref import lora_expand_ref, lora_shrink_ref, multi_lora_ref


def _use_kernel(x: torch.Tensor) -> bool:
    """TRTLLM_BDLORA_KERNEL=triton|torch forces a path (triton on CPU needs TRITON_INTERPRET=1)."""
    choice = os.environ.get("TRTLLM_BDLORA_KERNEL", "auto")
    return choice == "triton" or (choice == "auto" and x.is_cuda)


def apply_lora_group(
    y: torch.Tensor,
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    slots: list[ModuleSlots],
    out_offsets: list[int],
    scheme: str,
    role: str,
    comm: Comm,
) -> torch.Tensor:
    """y (the rank's local output, or partial sum for row modules) += this batch's LoRA terms."""
    if scheme != "slora" or comm.world == 1:
        a = [s.a for s in slots]
        b = [s.b for s in slots]
        ranks = [s.ranks for s in slots]
        scales = [s.scales for s in slots]
        if _use_kernel(x):
            from trtllm_bdlora.kernels.multi_lora import multi_lora

            return multi_lora(y, x, slot_ids, a, b, ranks, scales, out_offsets)
        if scheme == "slora":
            for s, off in zip(slots, out_offsets):
                h = lora_shrink_ref(x, s.a, slot_ids, s.ranks)
                lora_expand_ref(y, h, s.b, slot_ids, s.b_ranks, s.scales, off + s.out_offset)
            return y
        return multi_lora_ref(y, x, slot_ids, a, b, ranks, scales, out_offsets)
    h = torch.stack([lora_shrink_ref(x, s.a, slot_ids, s.ranks) for s in slots])
    h = comm.all_gather(h, "lora") if role == "column" else comm.all_reduce(h, "lora")
    for hj, s, off in zip(h, slots, out_offsets):
        lora_expand_ref(y, hj, s.b, slot_ids, s.b_ranks, s.scales, off + s.out_offset)
    return y

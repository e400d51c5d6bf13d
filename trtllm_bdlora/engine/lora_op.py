"""The LoRA site of one linear group (fused q|k|v, o, fused gate|up, down) on one rank.

Dispatches the multi-adapter op to the Triton kernel on CUDA and to the batched torch op
(`kernels.lora_cpu`) elsewhere; under `slora` it splits into shrink, collective, expand.
`kernel` (EngineConfig.lora_kernel, from TRTLLM_BDLORA_KERNEL at start-up) forces a path: `reference` runs the
torch reference instead (for comparisons), `triton` the kernel (on CPU it needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.engine.adapter_pool import ModuleSlots
from trtllm_bdlora.kernels import lora_cpu, lora_ref

_TORCH_OPS = {  # (fused multi-output op, shrink, expand): the batched op and its reference share one contract
    "torch": (lora_cpu.multi_lora_cpu, lora_cpu.lora_shrink_cpu, lora_cpu.lora_expand_cpu),
    "reference": (lora_ref.multi_lora_ref, lora_ref.lora_shrink_ref, lora_ref.lora_expand_ref),
}


def apply_lora_group(
    y: torch.Tensor,
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    slots: list[ModuleSlots],
    out_offsets: list[int],
    scheme: str,
    role: str,
    comm: Comm,
    kernel: str = "auto",
) -> torch.Tensor:
    """y (the rank's local output, or partial sum for row modules) += this batch's LoRA terms."""
    if kernel == "auto":
        kernel = "triton" if x.is_cuda else "torch"
    multi, shrink, expand = _TORCH_OPS["reference" if kernel == "reference" else "torch"]
    if scheme != "slora" or comm.world == 1:
        a = [s.a for s in slots]
        b = [s.b for s in slots]
        ranks = [s.ranks for s in slots]
        scales = [s.scales for s in slots]
        if kernel == "triton":
            from trtllm_bdlora.kernels.multi_lora import multi_lora

            return multi_lora(y, x, slot_ids, a, b, ranks, scales, out_offsets)
        if scheme == "slora":
            for s, off in zip(slots, out_offsets):
                expand(y, shrink(x, s.a, slot_ids, s.ranks), s.b, slot_ids, s.b_ranks, s.scales, off + s.out_offset)
            return y
        return multi(y, x, slot_ids, a, b, ranks, scales, out_offsets)
    h = torch.stack([shrink(x, s.a, slot_ids, s.ranks) for s in slots])
    h = comm.all_gather(h, "lora") if role == "column" else comm.all_reduce(h, "lora")
    for hj, s, off in zip(h, slots, out_offsets):
        expand(y, hj, s.b, slot_ids, s.b_ranks, s.scales, off + s.out_offset)
    return y

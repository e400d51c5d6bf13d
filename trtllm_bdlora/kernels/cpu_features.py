"""What this CPU's oneDNN multiplies natively: bfloat16 and float16 GEMMs need AVX-512 (or AVX-NE-CONVERT / AMX);
elsewhere (an AVX2 CPU) torch runs them on a slow fallback and oneDNN's weight prepacking refuses them."""

from __future__ import annotations

import functools

import torch


@functools.cache
def onednn_fast(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native CPU kernels for `dtype` here (float32: wherever oneDNN is built in)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == torch.float32


def slow_dtype_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """A one-line warning when `dtype` has no native CPU kernels here, else None."""
    if device.type != "cpu" or dtype == torch.float32 or onednn_fast(dtype):
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"--dtype {name}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native {name} GEMMs "
            f"(they need AVX-512 BF16/FP16 or AMX); {name} runs correctly here but several times slower than float32")

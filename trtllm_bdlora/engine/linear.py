"""A base linear layer of the engine: `y = x @ W.T` with W [out, in], on CPU through oneDNN with W prepacked.

On CPU, torch's `x @ W.T` goes to MKL with a transposed B, and for the skinny products of decoding (a few tokens
against a large weight that does not stay in cache) that path streams the weight far below memory speed: one
thread, 8 tokens, smollm2-135m's LM head (49152 x 576, float32) took 127 ms against 35 ms with the weight
reordered once into oneDNN's blocked layout (the op torch's inductor uses for CPU linears); a whole decode step's
base GEMMs 185 against 82 ms, and 60 against 40 ms in bfloat16 (2026-12-06, load average 16). The packed weight
replaces the plain one (same bytes); off CPU, without oneDNN, or in a dtype this CPU's oneDNN has no kernels for
(bfloat16 / float16 without AVX-512: `kernels.cpu_features`), the plain product is used.

oneDNN builds (JIT-compiles) a kernel for every new number of rows, at several ms per weight shape, and keeps a
bounded cache of them; the steps of continuous batching come in every row count up to --max-num-tokens. Rows are
therefore padded up to `padded_rows`: a multiple of 8, or above 64 rows of an eighth of the power of two below
(less than 12.5% padding), so that a server meets about 8 kernels per doubling of the row count instead of one per count.
Padding costs what the extra rows compute: a decode step of 8 sequences padded to 16 rows took 45-50 ms of base
GEMMs against 37 ms unpadded (two threads, 2026-12-06, load average 1).

Float32 on a CPU whose best vector unit is AVX2 goes to `kernels.avx2` instead (faster than oneDNN there at every
row count measured; no padding needed).
"""

from __future__ import annotations

import torch

from trtllm_bdlora.kernels import avx2
from trtllm_bdlora.kernels.cpu_features import onednn_fast

PACK_BATCH_HINT = 16  # tokens per step the blocked layout is chosen for (any count works)
MIN_ROW_BUCKET = 8


def padded_rows(rows: int) -> int:
    """The row count `rows` is padded up to (see the module docstring)."""
    bucket = max(MIN_ROW_BUCKET, (1 << (rows.bit_length() - 1)) // 8)
    return -(-rows // bucket) * bucket


def _can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dim() == 2 and onednn_fast(weight.dtype)
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear:
    def __init__(self, weight: torch.Tensor, pack: bool = True):
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        self.nbytes = weight.numel() * weight.element_size()
        self.panels = avx2.pack(weight) if pack and avx2.usable(weight) else None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT) \
            if pack and self.panels is None and _can_pack(weight) else None
        self.weight = None if self.packed is not None or self.panels is not None else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels is not None:
            return avx2.matmul(x, self.panels, self.shape[0])
        if self.packed is None:
            return x @ self.weight.T
        rows = x.shape[0]
        pad = padded_rows(rows) - rows
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return y[:rows] if pad else y

"""The multi-adapter (BD-)LoRA op in OpenAI Triton: shrink and expand fused, one launch for all outputs.

One source serves three callers: the torch backend on CUDA, the CPU tests (TRITON_INTERPRET=1), and
the TensorRT plugin through ahead-of-time compilation (kernels/aot.py).

Adapters are described by tables, so slot buffers and per-request pointers look the same:
  ptr_table   int64 [n_out, S, 2]  address of A (rows of length K) and of B (rows of length b_stride)
  meta_table  int32 [n_out, S, 3]  (rank, rank_offset, b_stride): this rank multiplies A rows and
                                   B columns [rank_offset, rank_offset + rank): its BD blocks only
  scale_table fp32  [n_out, S]
  out_offset, out_size int32 [n_out]: where output j lands in y's columns and how wide it is
Tokens are grouped per adapter on the device: token_idx [T] lists token rows, adapter s owns
token_idx[seg_start[s] : seg_start[s] + seg_len[s]] (no host synchronisation).
Each (token, output column) is written by exactly one program, so no atomics are needed.
Low-precision tiles are widened to fp32 before tl.dot (TF32 on tensor cores, fp32 accumulation): the op
is bandwidth-bound at LoRA ranks, and the interpreter cannot multiply bf16 tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bdlora_fused_kernel(
    x_ptr, y_ptr, token_idx_ptr, seg_start_ptr, seg_len_ptr,
    ptr_table, meta_table, scale_table, out_offset_ptr, out_size_ptr,
    K, stride_xt, stride_yt, num_slots, m_blocks,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    j = tl.program_id(1)
    s = tl.program_id(2)
    pid_t = pid // m_blocks
    pid_m = pid % m_blocks
    seg_len = tl.load(seg_len_ptr + s)
    M = tl.load(out_size_ptr + j)
    entry = j * num_slots + s
    rank = tl.load(meta_table + entry * 3)
    if (pid_t * BLOCK_T < seg_len) & (pid_m * BLOCK_M < M) & (rank > 0):
        r_off = tl.load(meta_table + entry * 3 + 1)
        b_stride = tl.load(meta_table + entry * 3 + 2)
        a_ptr = tl.load(ptr_table + entry * 2).to(tl.pointer_type(x_ptr.dtype.element_ty))
        b_ptr = tl.load(ptr_table + entry * 2 + 1).to(tl.pointer_type(x_ptr.dtype.element_ty))
        scale = tl.load(scale_table + entry)
        seg_start = tl.load(seg_start_ptr + s)

        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < seg_len
        tok = tl.load(token_idx_ptr + seg_start + offs_t, mask=t_mask, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        rows = (r_off + offs_r).to(tl.int64)

        h = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                         mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptr + rows[None, :] * K + offs_k[:, None],
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            if IEEE:
                h += tl.dot(xt, at, input_precision="ieee")
            else:
                h += tl.dot(xt.to(tl.float32), at.to(tl.float32))

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        bt = tl.load(b_ptr + offs_m[None, :].to(tl.int64) * b_stride + rows[:, None],
                     mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        if IEEE:
            out = tl.dot(h, bt, input_precision="ieee")
        else:
            out = tl.dot(h, bt.to(tl.float32))
        out = out * scale
        out_off = tl.load(out_offset_ptr + j)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + out_off + offs_m[None, :]
        y_mask = t_mask[:, None] & m_mask[None, :]
        acc = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32) + out
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)

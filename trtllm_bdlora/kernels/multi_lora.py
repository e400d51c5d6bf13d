"""Host side of the Triton multi-adapter op: adapter tables, device-side token grouping, launch."""

from __future__ import annotations

import functools

import torch

BLOCK_T, BLOCK_K, BLOCK_M = 16, 64, 64


def group_tokens(slot_ids: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_idx, seg_start, seg_len): tokens sorted by slot (no-adapter tokens last), on the device."""
    key = torch.where(slot_ids >= 0, slot_ids, num_slots).to(torch.int64)
    token_idx = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
    seg_start = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    return token_idx, seg_start, counts.to(torch.int32)


@functools.lru_cache(maxsize=1024)
def _pointer_table(layout: tuple[tuple[int, int, int, int, int], ...], device: torch.device) -> torch.Tensor:
    """[n_out, S, 2] slot addresses of A and B; depends only on the buffers' addresses and strides, so it is built
    once per buffer set instead of on every step (the slot buffers live as long as the adapter pool)."""
    rows = [[[a_ptr + s * a_step, b_ptr + s * b_step] for s in range(num_slots)]
            for a_ptr, a_step, b_ptr, b_step, num_slots in layout]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def slot_tables(
    a_slots: list[torch.Tensor], b_slots: list[torch.Tensor], ranks: list[torch.Tensor], scales: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables for stacked slot buffers a [S, R, K] and b [S, M, Rb] (row-major rows)."""
    for a, b in zip(a_slots, b_slots):
        if a.stride(-1) != 1 or b.stride(-1) != 1 or a.stride(1) != a.shape[2]:
            raise ValueError("slot buffers must have contiguous rows")
    layout = tuple((a.data_ptr(), a.stride(0) * a.element_size(), b.data_ptr(), b.stride(0) * b.element_size(),
                    a.shape[0]) for a, b in zip(a_slots, b_slots))
    ptr_table = _pointer_table(layout, a_slots[0].device)
    meta = torch.stack([
        torch.stack([r.to(torch.int32), torch.zeros_like(r, dtype=torch.int32),
                     torch.full_like(r, b.stride(1), dtype=torch.int32)], -1)
        for r, b in zip(ranks, b_slots)
    ])
    return ptr_table, meta.contiguous(), torch.stack([s.float() for s in scales]).contiguous()


def launch(
    y: torch.Tensor,
    x: torch.Tensor,
    token_idx: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    ptr_table: torch.Tensor,
    meta_table: torch.Tensor,
    scale_table: torch.Tensor,
    out_offsets: list[int],
    out_sizes: list[int],
    max_rank: int,
) -> torch.Tensor:
    from trtllm_bdlora.kernels.bdlora_triton import bdlora_fused_kernel

    n_out, num_slots = scale_table.shape
    if x.shape[0] == 0 or num_slots == 0 or max_rank == 0:
        return y
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y need contiguous rows")
    block_r = max(16, 1 << (max_rank - 1).bit_length())
    m_blocks = -(-max(out_sizes) // BLOCK_M)
    grid = (-(-x.shape[0] // BLOCK_T) * m_blocks, n_out, num_slots)
    dev = x.device
    bdlora_fused_kernel[grid](
        x, y, token_idx, seg_start, seg_len, ptr_table, meta_table, scale_table,
        torch.tensor(out_offsets, dtype=torch.int32).to(dev), torch.tensor(out_sizes, dtype=torch.int32).to(dev),
        x.shape[1], x.stride(0), y.stride(0), num_slots, m_blocks,
        BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M, BLOCK_R=block_r, IEEE=x.dtype == torch.float32,
    )
    return y


def multi_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    a_slots: list[torch.Tensor],
    b_slots: list[torch.Tensor],
    ranks: list[torch.Tensor],
    scales: list[torch.Tensor],
    out_offsets: list[int],
) -> torch.Tensor:
    """Same contract as kernels.lora_ref.multi_lora_ref, computed by the Triton kernel. Slot buffers use rank
    offset 0; per-request pointers with BD rank offsets (the plugin's form) go through `launch` directly."""
    x = x.contiguous()
    tables = slot_tables(a_slots, b_slots, ranks, scales)
    token_idx, seg_start, seg_len = group_tokens(slot_ids, a_slots[0].shape[0])
    cap = max(a.shape[1] for a in a_slots)
    return launch(y, x.to(a_slots[0].dtype), token_idx, seg_start, seg_len, *tables, out_offsets,
                  [b.shape[1] for b in b_slots], cap)

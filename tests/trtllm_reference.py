"""An executable model of the production path on one rank, for tests and for reading.

1. `split_like_copy_to_pages`: TensorRT-LLM's LoraCache::copyToPages split of one config row
   (column modules: A whole, contiguous out-slice of B; row modules: in-slice of A, B whole).
2. `plugin_tables`: the BD-LoRA plugin's host logic (plugins/src/bdlora_host.cpp mirrors it): per-request
   ranks, pointers and context lengths -> the kernel's token segments and adapter tables, selecting
   this rank's block rows [tp_rank*r/tp, (tp_rank+1)*r/tp) of A and the same columns of B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trtllm_bdlora.adapters.trtllm_format import MODULE_NAMES, weights_as_torch
from trtllm_bdlora.llama.shape import module_role


@dataclass
class RankPages:
    """One rank's (A, B) pages for one config row, as the runtime hands them to the plugin."""

    a: torch.Tensor  # [rank, local_in]
    b: torch.Tensor  # [local_out, rank]
    rank: int


def split_like_copy_to_pages(
    weights_row: np.ndarray, config_row: np.ndarray, in_dim: int, out_dim: int, tp: int, tp_rank: int
) -> RankPages:
    module_id, _, r = (int(v) for v in config_row[:3])
    name = MODULE_NAMES[module_id]
    flat = weights_as_torch(weights_row)  # the engine's dtype (bf16 storage included)
    a = flat[: r * in_dim].view(r, in_dim)
    b = flat[r * in_dim : r * in_dim + out_dim * r].view(out_dim, r)
    if module_role(name) == "row":  # splitIn: columns [tp_rank*in/tp, ...) of A
        a = a[:, tp_rank * in_dim // tp : (tp_rank + 1) * in_dim // tp]
    else:  # splitOut: contiguous slice view(weightsOut, {tp, out/tp, r})[tp_rank]
        b = b.view(tp, out_dim // tp, r)[tp_rank]
    return RankPages(a.contiguous(), b.contiguous(), r)


@dataclass
class PluginTables:
    token_idx: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    ptr_table: torch.Tensor
    meta_table: torch.Tensor
    scale_table: torch.Tensor
    max_rank: int


def plugin_tables(
    host_request_types: list[int],
    host_context_lengths: list[int],
    ranks: list[list[int]],
    pointers: list[list[tuple[int, int]]],
    tp: int,
    tp_rank: int,
) -> PluginTables:
    """ranks[j][req], pointers[j][req] = (A ptr, B ptr) for output j; requests' tokens are contiguous
    (remove_input_padding): context requests own context_length tokens, generation requests one."""
    lengths = [c if t == 0 else 1 for t, c in zip(host_request_types, host_context_lengths)]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    n_out, batch = len(ranks), len(lengths)
    ptr = np.zeros((n_out, batch, 2), dtype=np.int64)
    meta = np.zeros((n_out, batch, 3), dtype=np.int32)
    max_rank = 0
    for j in range(n_out):
        for i in range(batch):
            r = ranks[j][i]
            if r % tp:
                raise ValueError(f"rank {r} of request {i} is not divisible by tp={tp}")
            local = r // tp
            ptr[j, i] = pointers[j][i]
            meta[j, i] = (local, tp_rank * local, r)  # rank, rank offset, B row stride (full rank)
            max_rank = max(max_rank, local)
    return PluginTables(
        token_idx=torch.arange(int(sum(lengths)), dtype=torch.int32),
        seg_start=torch.from_numpy(starts),
        seg_len=torch.tensor(lengths, dtype=torch.int32),
        ptr_table=torch.from_numpy(ptr),
        meta_table=torch.from_numpy(meta),
        scale_table=torch.ones(n_out, batch),  # TensorRT-LLM folds the scaling into B
        max_rank=max_rank,
    )


def plugin_reference(x: torch.Tensor, tables: PluginTables, pages: list[list[RankPages]], out_sizes: list[int],
                     counter: dict | None = None) -> list[torch.Tensor]:
    """The plugin's math in torch (independent of the kernel): one output per module; counts the
    factor elements it multiplies in `counter`."""
    outs = []
    for j, m in enumerate(out_sizes):
        y = x.new_zeros(x.shape[0], m)
        for i in range(tables.seg_len.numel()):
            local, off, _ = (int(v) for v in tables.meta_table[j, i])
            if local == 0:
                continue
            s, n = int(tables.seg_start[i]), int(tables.seg_len[i])
            p = pages[j][i]
            a_blk, b_blk = p.a[off : off + local], p.b[:, off : off + local]
            y[s : s + n] += (x[s : s + n] @ a_blk.T) @ b_blk.T
            if counter is not None:
                counter["a"] = counter.get("a", 0) + a_blk.numel()
                counter["b"] = counter.get("b", 0) + b_blk.numel()
        outs.append(y)
    return outs

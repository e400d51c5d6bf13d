"""A step's attention in one layer: one SDPA call per run of decoding sequences in consecutive cache rows, and
one for all the prefill chunks.

The decoding sequences (one new token each) of a run are the batch rows of a call whose keys are a view of their
cache rows (no copy). A row that is not decoding this step (a kept prefix, a finished or prefilling sequence) ends
a run rather than be computed and thrown away. The prefill chunks of the step (more than one token each) are one
call, padded to the longest chunk. GQA runs on a grouped view: a KV head's `group` query heads are laid along the
query axis, so K and V are never repeated. Query head h uses KV head h // group, as HF's repeat_kv. In float32 on
an AVX2 CPU the whole step is one call of `kernels.avx2.cache_attention` instead, every token a query over its own
row's keys up to its position, read in place (no padding, mask or copy of the rows): a decoding token's query heads
share one pass over their KV head, and a prompt chunk's queries run blocked, as flash attention does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtllm_bdlora.engine.kv_cache import KVCache, StepLayout
from trtllm_bdlora.kernels import avx2


def write_kv(cache: KVCache, layer: int, step: StepLayout, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the step's K and V ([T, kv_heads, head_dim], already rotated) at their positions."""
    d = cache.head_dim
    for which, x in ((0, k), (1, v)):
        cache.view(layer, which).view(-1, d).index_copy_(0, step.write_index, x.reshape(-1, d))


def step_attention(cache: KVCache, layer: int, step: StepLayout, q: torch.Tensor) -> torch.Tensor:
    """q [T, heads, head_dim] (rotated) -> attention output [T, heads * head_dim], after `write_kv`."""
    t, heads, d = q.shape
    kv_heads = cache.kv_heads
    group = heads // kv_heads
    out = q.new_empty(t, heads * d)
    k_all, v_all = cache.view(layer, 0), cache.view(layer, 1)
    if d % 8 == 0 and avx2.usable(q):
        avx2.cache_attention(q, k_all, v_all, step.token_index, step.token_rows, step.token_keys, out)
        return out
    for run in step.decode:
        rows = run.hi - run.lo
        o = F.scaled_dot_product_attention(q.index_select(0, run.tokens).view(rows, kv_heads, group, d),
                                           k_all[run.lo:run.hi, :, :run.keys], v_all[run.lo:run.hi, :, :run.keys],
                                           attn_mask=run.mask)
        out.index_copy_(0, run.tokens, o.reshape(rows, heads * d))
    if step.prefill_tokens is not None:
        chunks, longest, keys = len(step.prefill_rows), step.prefill_queries, step.prefill_keys
        q_pre = q.new_zeros(chunks * longest, heads, d).index_copy_(
            0, step.prefill_slots, q.index_select(0, step.prefill_tokens))
        q_pre = q_pre.view(chunks, longest, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(
            chunks, kv_heads, group * longest, d)
        k = k_all[:, :, :keys].index_select(0, step.prefill_rows)
        v = v_all[:, :, :keys].index_select(0, step.prefill_rows)
        o = F.scaled_dot_product_attention(q_pre, k, v, attn_mask=step.prefill_mask)
        o = o.view(chunks, kv_heads, group, longest, d).permute(0, 3, 1, 2, 4).reshape(chunks * longest, heads * d)
        out.index_copy_(0, step.prefill_tokens, o.index_select(0, step.prefill_slots))
    return out

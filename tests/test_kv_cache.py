"""The preallocated KV cache and the batched attention: against float64 per-sequence attention, HF transformers,
and the float32 engine; admission against the cache's budget."""

import math

import pytest
import torch

from tests.helpers import make_tiny_llama
from trtllm_bdlora.engine.attention import step_attention, write_kv
from trtllm_bdlora.engine.kv_cache import KVBudget, KVCache, KVCacheFullError, budget_from_bytes, kv_bytes_per_token
from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
from trtllm_bdlora.errors import BdLoraError, RequestError

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 8


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """float64, one sequence: q [n, heads, d] at positions start.., keys/values [start + n, kv_heads, d]."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    n, total = q.shape[0], keys.shape[0]
    allowed = torch.arange(total)[None, :] <= (start + torch.arange(n))[:, None]
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return out.transpose(0, 1).reshape(n, -1)


@pytest.mark.parametrize("cpu_kernels", ["torch", "avx2"], indirect=True)
def test_step_attention_matches_float64_through_relayouts(cpu_kernels):
    """Steps mixing prefill chunks and decodes, sequences joining and leaving, the capacity growing (rows halve)
    and shrinking again: every token's attention equals float64 attention over its own sequence."""
    gen = torch.Generator().manual_seed(1)
    layers = 2
    cache = KVCache(layers, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"), KVBudget(tokens=64, max_seq_len=64))
    keys: dict[int, list[torch.Tensor]] = {}  # seq_id -> per layer [tokens so far, kv_heads, d]
    values: dict[int, list[torch.Tensor]] = {}
    # (seq_id, new tokens) per step; None frees the sequence
    script = [
        [(0, 5), (1, 3), (2, 1), (3, 7)],  # capacity 16, 4 rows
        [(0, 1), (1, 4), (2, 1), (3, 1)],
        [(1, None), (3, None)],
        [(0, 12), (2, 1)],  # sequence 0 reaches 18 tokens: capacity 32, 2 rows (a relayout)
        [(0, 1), (2, 1)],
        [(0, 1), (2, 6)],
        [(0, None)],
        [(2, 1), (4, 2), (5, 3)],  # 3 sequences need 3 rows: capacity back to 16 (a relayout)
        [(2, 1), (4, 1), (5, 1)],
        [(4, None), (5, 1), (6, 4), (7, 1)],  # 6 and 7 take free rows; rows of decodes are not contiguous
        [(5, 1), (6, 1), (7, 1), (2, 1)],  # decodes in another order than their rows
        [(6, None), (2, 1), (5, 1), (7, 1)],  # a free row between decoding rows: two runs, the row read by neither
        [(2, None), (5, None), (7, None), (8, 3), (9, 3)],
        [(8, 1), (9, 1)],  # one run of equal lengths
    ]
    capacities, runs = [], []
    empty = torch.zeros(0, KV_HEADS, HEAD_DIM)
    for step in script:
        for seq_id, n in step:
            if n is None:
                cache.free(seq_id)
                del keys[seq_id], values[seq_id]
        chunks = [SeqChunk(s, [0] * n, keys[s][0].shape[0] if s in keys else 0, -1) for s, n in step if n is not None]
        if not chunks:
            continue
        layout = cache.begin_step(chunks, HEADS // KV_HEADS)
        capacities.append(cache.capacity)
        decoding_rows = sorted(cache.rows[c.seq_id] for c in chunks if len(c.tokens) == 1)
        assert [r for run in layout.decode for r in range(run.lo, run.hi)] == decoding_rows
        runs.append(len(layout.decode))
        t = sum(len(c.tokens) for c in chunks)
        for layer in range(layers):
            q = torch.randn(t, HEADS, HEAD_DIM, generator=gen)
            k = torch.randn(t, KV_HEADS, HEAD_DIM, generator=gen)
            v = torch.randn(t, KV_HEADS, HEAD_DIM, generator=gen)
            write_kv(cache, layer, layout, k, v)
            out = step_attention(cache, layer, layout, q)
            t0 = 0
            for c in chunks:
                n = len(c.tokens)
                seq_k = keys.setdefault(c.seq_id, [empty] * layers)
                seq_v = values.setdefault(c.seq_id, [empty] * layers)
                seq_k[layer] = torch.cat([seq_k[layer], k[t0 : t0 + n]])
                seq_v[layer] = torch.cat([seq_v[layer], v[t0 : t0 + n]])
                want = reference_attention(q[t0 : t0 + n], seq_k[layer], seq_v[layer], c.start)
                torch.testing.assert_close(out[t0 : t0 + n].double(), want, rtol=1e-5, atol=1e-5)
                t0 += n
        assert cache.lengths == {s: kv[0].shape[0] for s, kv in keys.items()}
    assert capacities[0] == 16 and 32 in capacities and capacities[-1] == 16, capacities
    assert runs[-3:] == [2, 0, 1], runs


def test_budget_rows_and_capacity():
    budget = KVBudget(tokens=1000, max_seq_len=300)
    assert [budget.capacity_for(n) for n in (1, 16, 17, 200, 256, 257, 300)] == [16, 16, 32, 256, 256, 300, 300]
    assert budget.rows_for(256) == 3 and budget.rows_for(300) == 3
    assert budget.fits([200, 10, 10]) and not budget.fits([200, 10, 10, 10])  # 4 rows of 256 > 1000 tokens
    assert budget.fits([16] * 62) and not budget.fits([16] * 63)
    assert not budget.fits([301])
    assert kv_bytes_per_token(30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    with pytest.raises(BdLoraError, match="holds 3 tokens per rank"):
        budget_from_bytes(3 * 512 + 7, 512, 256)


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """A random Llama with grouped-query attention: 6 query heads on 2 KV heads (head_dim 16)."""
    return make_tiny_llama(tmp_path_factory.mktemp("gqa"), seed=3, heads=6, kv_heads=2, hidden=96)


PROMPTS = [[5, 17, 3, 99, 42, 7, 1, 64, 12, 200, 9, 31, 4], [8, 8, 200], [11, 12, 13, 14, 15, 16, 17], [250, 3, 77, 1, 2]]


def _engine(model_dir, dtype="float32", kv_cache_bytes=None):
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine

    return Engine(Comm(0, 1, torch.device("cpu")), str(model_dir), "bdlora", [], max_loras=2, dtype=dtype,
                  kv_cache_bytes=kv_cache_bytes)


def _requests(prompts, max_tokens):
    import json

    return [json.dumps({"id": i, "prompt_ids": p, "max_tokens": max_tokens}) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def hf_reference(gqa_llama):
    """transformers' own Llama: per-prompt logits and 6 greedy tokens."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(gqa_llama).eval()
    ref = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            ref.append((model(ids).logits[0], gen[0, len(prompt):].tolist()))
    return ref


def _prefill_logits(engine) -> list[torch.Tensor]:
    chunks = [SeqChunk(i, p, 0, -1) for i, p in enumerate(PROMPTS)]
    logits = engine.lead(StepPlan(chunks=chunks, all_logits=True))
    engine.lead(StepPlan(free=list(range(len(PROMPTS)))))
    return list(logits.split([len(p) for p in PROMPTS]))


@pytest.mark.parametrize("cpu_kernels", ["torch", "avx2"], indirect=True)
def test_gqa_engine_matches_transformers_with_chunked_prefill(gqa_llama, hf_reference, cpu_kernels):
    """Prompt logits of a batch in one step, and greedy tokens with prompts prefilled 4 tokens a step beside the
    other sequences' decodes, equal transformers."""
    from trtllm_bdlora.engine.generate import run_requests

    engine = _engine(gqa_llama)
    for got, (want, _) in zip(_prefill_logits(engine), hf_reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    results = run_requests(engine, _requests(PROMPTS, 6), max_batch_size=8, max_num_tokens=4)
    assert [r["output_ids"] for r in results] == [tokens for _, tokens in hf_reference]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(gqa_llama, hf_reference, dtype):
    """bf16 / fp16 prompt logits within their precision of the float32 model's (relative L2 error), and the
    greedy next token mostly the same."""
    half = _prefill_logits(_engine(gqa_llama, dtype))
    tolerance = {"bfloat16": 3e-2, "float16": 5e-3}[dtype]
    agree = total = 0
    for got, (want, _) in zip(half, hf_reference):
        error = float((got - want).norm() / want.norm())
        assert error < tolerance, (dtype, error)
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += want.shape[0]
    assert agree / total >= 0.9, (dtype, agree, total)


def test_kv_budget_refuses_too_long_and_queues_the_rest(gqa_llama, hf_reference):
    """A 64-token cache: a request needing 70 tokens fails alone with one line; four needing up to 13 + 6 = 19
    tokens (rows of 32: two at a time) wait and then run, with transformers' tokens."""
    from trtllm_bdlora.engine.request import SamplingParams, build_request
    from trtllm_bdlora.engine.scheduler import Scheduler

    per_token = kv_bytes_per_token(2, KV_HEADS, 16, torch.float32)
    engine = _engine(gqa_llama, kv_cache_bytes=64 * per_token)
    assert engine.kv_budget.tokens == 64
    scheduler = Scheduler(engine, max_batch_size=8, max_num_tokens=64)
    asked = [(i, p, 6) for i, p in enumerate(PROMPTS)] + [("long", [1] * 10, 60)]
    for index, (rid, prompt, max_tokens) in enumerate(asked):
        scheduler.add(build_request(prompt, SamplingParams(max_tokens), vocab_size=engine.shape.vocab_size,
                                    max_seq_len=engine.max_seq_len, id=rid, index=index))
    done, most_running = {}, 0
    while scheduler.busy:
        for req, _ in scheduler.step():
            done[req.id] = req
        most_running = max(most_running, len(scheduler.running))
    scheduler.flush()
    long = done.pop("long")
    message = str(long.error)
    assert long.finish_reason == "error" and isinstance(long.error, RequestError) and "\n" not in message
    assert "70 tokens" in message and "KV cache of 64 tokens" in message, message
    assert most_running == 2
    assert [done[i].output_ids for i in range(len(PROMPTS))] == [tokens for _, tokens in hf_reference]
    assert not engine.model.kv_cache.rows  # every row freed


def test_plan_over_the_budget_raises(gqa_llama):
    per_token = kv_bytes_per_token(2, KV_HEADS, 16, torch.float32)
    engine = _engine(gqa_llama, kv_cache_bytes=64 * per_token)
    with pytest.raises(KVCacheFullError, match="3 sequences of up to 30 tokens do not fit the KV cache of 64 tokens"):
        engine.execute(StepPlan(chunks=[SeqChunk(i, [1] * 30, 0, -1) for i in range(3)]))

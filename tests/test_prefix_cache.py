"""Prefix caching: a new sequence copies the KV of the prompt prefix a running sequence holds (same adapter), and the
tokens equal transformers' as if it had computed them; requests for prompt logits compute everything; the flag
turns it off; the plan carries the copies to every rank."""

import pytest
import torch

from tests.helpers import make_tiny_llama, record_copies
from trtllm_bdlora.engine.kv_cache import KVBudget, KVCache
from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
from trtllm_bdlora.engine.scheduler import common_prefix
from trtllm_bdlora.errors import BdLoraError

SYSTEM = [7, 19, 3, 250, 41, 41, 8, 100, 12, 5, 66, 91]  # a shared "system prompt"
PROMPTS = [SYSTEM + [1, 2, 3], SYSTEM + [4, 5], SYSTEM + [1, 2, 9, 9], SYSTEM[:6] + [77], [200, 3, 4]]


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 5], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 2) == 2  # never the whole prompt: its last token is computed
    assert common_prefix([9], [1], 5) == 0


def test_plan_carries_copies_as_json():
    plan = StepPlan(chunks=[SeqChunk(3, [4, 5], 12, -1)], copies=[(1, 3, 12)])
    again = StepPlan.from_json(plan.to_json())
    assert again.copies == [(1, 3, 12)] and again.chunks == plan.chunks
    assert "copies" not in StepPlan(chunks=plan.chunks).to_json()


def test_kv_cache_copies_only_what_the_source_holds():
    cache = KVCache(2, 2, 8, torch.float32, torch.device("cpu"), KVBudget(256, 64))
    cache.begin_step([SeqChunk(0, [1] * 10, 0, -1)], 1)
    cache.storage.copy_(torch.randn(cache.storage.shape))
    cache.begin_step([SeqChunk(0, [1], 10, -1), SeqChunk(1, [1, 2], 6, -1)], 1, copies=[(0, 1, 6)])
    src, dst = cache.rows[0], cache.rows[1]
    for layer in range(2):
        for which in (0, 1):
            view = cache.view(layer, which)
            assert torch.equal(view[dst, :, :6], view[src, :, :6])
    with pytest.raises(BdLoraError, match="the source holds 11"):  # its position 11 is written by this step
        cache.begin_step([SeqChunk(0, [1], 11, -1), SeqChunk(2, [1], 12, -1)], 1, copies=[(0, 2, 12)])
    with pytest.raises(BdLoraError, match="must be new"):
        cache.begin_step([SeqChunk(1, [1], 8, -1)], 1, copies=[(0, 1, 6)])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("prefix"), seed=5, heads=4, kv_heads=2, hidden=64)


@pytest.fixture(scope="module")
def hf_tokens(model_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, len(p):]
                .tolist() for p in PROMPTS]


def _serve_staggered(model_dir, prefix_caching=True, prompt_logprobs=None):
    """The first prompt alone for two steps, then the rest: they find it holding SYSTEM. Returns the tokens, the
    plans' copies and the scheduler's counters."""
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine
    from trtllm_bdlora.engine.request import SamplingParams, build_request
    from trtllm_bdlora.engine.scheduler import Scheduler

    engine = Engine(Comm(0, 1, torch.device("cpu")), str(model_dir), "bdlora", [], max_loras=1,
                    prefix_caching=prefix_caching)
    copies = record_copies(engine)
    scheduler = Scheduler(engine, max_batch_size=8, max_num_tokens=8)
    requests = [build_request(p, SamplingParams(5, prompt_logprobs=prompt_logprobs if i == 2 else None),
                              vocab_size=engine.shape.vocab_size, max_seq_len=engine.max_seq_len, id=i, index=i)
                for i, p in enumerate(PROMPTS)]
    scheduler.add(requests[0])
    scheduler.step()
    scheduler.step()  # request 0 holds its 15 prompt tokens' KV now (8 + 7)
    for req in requests[1:]:
        scheduler.add(req)
    while scheduler.busy:
        scheduler.step()
    scheduler.flush()
    assert not engine.model.kv_cache.rows
    return [r.output_ids for r in requests], copies, scheduler.stats


def test_copied_prefixes_give_transformers_tokens(model_dir, hf_tokens):
    tokens, copies, stats = _serve_staggered(model_dir)
    assert tokens == hf_tokens
    # request 1 and 2 copy SYSTEM (+ [1, 2] for 2) from request 0; 3 copies 6 tokens; 4 shares nothing
    assert sorted(copies) == [(0, 1, 12), (0, 2, 14), (0, 3, 6)], copies
    assert stats.prefix_hit_tokens == 32 and stats.prefix_query_tokens == sum(map(len, PROMPTS))


def test_prompt_logprobs_and_the_flag_compute_every_prompt(model_dir, hf_tokens):
    tokens, copies, _ = _serve_staggered(model_dir, prompt_logprobs=1)
    assert tokens == hf_tokens and sorted(copies) == [(0, 1, 12), (0, 3, 6)]  # request 2 asked for prompt logprobs
    tokens, copies, stats = _serve_staggered(model_dir, prefix_caching=False)
    assert tokens == hf_tokens and copies == [] and stats.prefix_hit_tokens == 0


def test_flag_reaches_the_engine_config():
    import argparse

    from trtllm_bdlora.cli.flags import add_engine_flags, build
    from trtllm_bdlora.config import EngineConfig

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    assert build(EngineConfig, p.parse_args([]), "engine").enable_prefix_caching is True
    assert build(EngineConfig, p.parse_args(["--no-enable-prefix-caching"]), "engine").enable_prefix_caching is False

"""Prefix caching: a new sequence copies the KV of the prompt prefix a running or finished sequence holds (same
adapter, same stored copy of it), and the tokens equal transformers' as if it had computed them; requests for prompt
logits compute everything; the flag turns it off; the plan carries the copies to every rank; finished sequences'
rows give way to requests that need the room."""

import pytest
import torch

from tests.helpers import make_peft_adapter, make_tiny_llama, record_copies
from trtllm_bdlora.engine.kv_cache import KVBudget, KVCache, kv_bytes_per_token
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


def _engine(model_dir, prefix_caching=True, **kwargs):
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine

    return Engine(Comm(0, 1, torch.device("cpu")), str(model_dir), "bdlora", kwargs.pop("adapters", []),
                  max_loras=1, prefix_caching=prefix_caching, **kwargs)


def _request(engine, prompt, index, max_tokens=5, adapter=None, **params):
    from trtllm_bdlora.engine.request import SamplingParams, build_request

    return build_request(prompt, SamplingParams(max_tokens, min_tokens=max_tokens, **params),
                         vocab_size=engine.shape.vocab_size, max_seq_len=engine.max_seq_len, id=index, index=index,
                         adapter=adapter)


def _run(scheduler, requests):
    for req in requests:
        scheduler.add(req)
    while scheduler.busy:
        scheduler.step()
    return [r.output_ids for r in requests]


def _serve_staggered(model_dir, prefix_caching=True, prompt_logprobs=None):
    """The first prompt alone for two steps, then the rest: they find it holding SYSTEM. Returns the tokens, the
    plans' copies and the scheduler's counters."""
    from trtllm_bdlora.engine.scheduler import Scheduler

    engine = _engine(model_dir, prefix_caching)
    copies = record_copies(engine)
    scheduler = Scheduler(engine, max_batch_size=8, max_num_tokens=8)
    requests = [_request(engine, p, i, prompt_logprobs=prompt_logprobs if i == 2 else None)
                for i, p in enumerate(PROMPTS)]
    scheduler.add(requests[0])
    scheduler.step()
    scheduler.step()  # request 0 holds its 15 prompt tokens' KV now (8 + 7)
    _run(scheduler, requests[1:])
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


def _hf_greedy(model_dir, prompts, n=5):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p):]
                .tolist() for p in prompts]


def test_finished_sequences_are_sources_for_requests_one_at_a_time(model_dir, hf_tokens):
    """Requests that come one after another (each finished before the next arrives) share prefixes too: the second
    copies SYSTEM from the first's kept row; a next turn of the conversation copies the whole earlier turn, prompt
    and answer up to its last token; the kept rows stay across idle steps and go when the work ends."""
    from trtllm_bdlora.engine.scheduler import Scheduler

    engine = _engine(model_dir)
    copies = record_copies(engine)
    scheduler = Scheduler(engine, max_batch_size=8, max_num_tokens=64)
    first, second = _request(engine, PROMPTS[0], 0), _request(engine, PROMPTS[1], 1)
    assert _run(scheduler, [first]) == [hf_tokens[0]]
    for _ in range(3):
        scheduler.step()  # idle: the finished row stays
    assert list(scheduler.cached) == [0] and 0 in engine.model.kv_cache
    assert _run(scheduler, [second]) == [hf_tokens[1]] and copies == [(0, 1, 12)]
    turn = PROMPTS[0] + first.output_ids + [33, 44]  # the conversation goes on
    follow = _request(engine, turn, 2)
    assert _run(scheduler, [follow]) == _hf_greedy(model_dir, [turn])
    assert copies[-1] == (0, 2, len(PROMPTS[0]) + 4), copies  # 4 of the 5 answer tokens are in the first's KV
    assert list(scheduler.cached) == [1, 0, 2]  # least recently used first
    scheduler.flush()
    assert not scheduler.cached and not engine.model.kv_cache.rows


def test_kept_rows_give_way_and_are_bounded(model_dir):
    """Finished rows never keep a request out: with a cache of two rows, requests one at a time each drop the
    oldest kept row they need, and at most max_batch_size rows are kept; tokens stay transformers'."""
    from trtllm_bdlora.engine.scheduler import Scheduler

    per_token = kv_bytes_per_token(2, 2, 16, torch.float32)
    engine = _engine(model_dir, kv_cache_bytes=64 * per_token)  # rows of 32: two
    scheduler = Scheduler(engine, max_batch_size=8, max_num_tokens=64)
    prompts = [[60 + i, *range(100, 111)] for i in range(4)]  # 12 + 5 tokens: a row of 32 each
    got = [_run(scheduler, [_request(engine, p, i)])[0] for i, p in enumerate(prompts)]
    assert got == _hf_greedy(model_dir, prompts)
    assert len(engine.model.kv_cache) == 2 and list(scheduler.cached) == [2, 3]
    wide = _request(engine, [90] * 20, 4, max_tokens=20)  # 40 tokens: a row of 64, the whole cache
    assert _run(scheduler, [wide]) == _hf_greedy(model_dir, [[90] * 20], 20) and list(scheduler.cached) == [4]
    scheduler.flush()
    small = Scheduler(engine, max_batch_size=2, max_num_tokens=64)
    _run(small, [_request(engine, [70 + i], i, max_tokens=2) for i in range(3)])
    assert len(small.cached) == 2


def test_a_kept_row_is_not_reused_after_its_adapter_changes(model_dir, tmp_path):
    """An adapter id unloaded and loaded again with other weights: the rows computed with the old weights are no
    source any more (the same prompt is computed again, and gives the new adapter's tokens)."""
    from trtllm_bdlora.adapters import load_peft_adapter
    from trtllm_bdlora.engine.plan import StepPlan
    from trtllm_bdlora.engine.scheduler import Scheduler

    first = make_peft_adapter(model_dir, tmp_path / "a", seed=1, r=4, nblocks=None)
    other = make_peft_adapter(model_dir, tmp_path / "b", seed=2, r=4, nblocks=None)
    engine = _engine(model_dir, adapters=[(1, str(first))])
    copies = record_copies(engine)
    scheduler = Scheduler(engine, max_batch_size=8, max_num_tokens=64)
    _run(scheduler, [_request(engine, PROMPTS[0], 0, adapter=1)])
    _run(scheduler, [_request(engine, PROMPTS[1], 1, adapter=1)])
    assert copies == [(0, 1, 12)]  # the same stored adapter: reused
    engine.lead(StepPlan(evict=[1]))  # what the OpenAI API's unload does once no request names the id
    engine.registry.unbind(1)
    engine.load_adapter(1, load_peft_adapter(other))
    again = _request(engine, PROMPTS[0], 2, adapter=1)
    _run(scheduler, [again])
    assert copies == [(0, 1, 12)] and 0 not in scheduler.cached and 1 not in scheduler.cached
    fresh = _engine(model_dir, adapters=[(1, str(other))], prefix_caching=False)
    assert again.output_ids == _run(Scheduler(fresh), [_request(fresh, PROMPTS[0], 0, adapter=1)])[0]

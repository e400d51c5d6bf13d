"""The scheduler in one process (TP 1 engine): chunked prefill under a token budget gives PEFT's tokens and prompt
logits, cancelled requests leave before the next step with their KV cache freed, and an exception in one
request's processing fails that request alone."""

import os
import re

import pytest
import torch

from tests.helpers import make_request
from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.engine.request import Request
from trtllm_bdlora.engine.scheduler import Running, Scheduler, plan_chunks
from trtllm_bdlora.errors import log_text

SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed in failures


@pytest.fixture(scope="module")
def engine(tiny_llama, bd_adapters):
    return Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(bd_adapters[0])), (2, str(bd_adapters[1]))],
                  max_loras=2)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (150, 61, 7)]


@pytest.fixture(scope="module")
def peft_reference(tiny_llama, bd_adapters, prompts):
    """(prompt logits, 12 greedy tokens) per (adapter, prompt) from PEFT, the independent reference."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), bd_adapters[0], adapter_name="1")
    model.load_adapter(bd_adapters[1], adapter_name="2")
    model.eval()
    ref = {}
    for adapter, prompt in zip((1, None, 2), prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    logits = model(ids).logits[0]
                    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            else:
                model.set_adapter(str(adapter))
                logits = model(ids).logits[0]
                out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        ref[adapter] = (logits, out[0, len(prompt):].tolist())
    return ref


def _requests(prompts) -> list[Request]:
    return [make_request(index=i, id=i, adapter=a, prompt_ids=p, max_tokens=12, end_ids=frozenset(),
                    return_context_logits=True) for i, (a, p) in enumerate(zip((1, None, 2), prompts))]


def _run(scheduler: Scheduler, requests: list[Request], per_step=None) -> int:
    for req in requests:
        scheduler.add(req)
    steps = 0
    while scheduler.busy:
        if per_step is not None:
            per_step(scheduler)
        scheduler.step()
        steps += 1
    scheduler.flush()
    return steps


@pytest.mark.parametrize("budget", [16, 4096])
def test_chunked_prefill_matches_peft(engine, prompts, peft_reference, budget):
    """Budget 16: the 150-token prompt is prefilled in 10 chunks while the 7-token one already decodes."""
    scheduler = Scheduler(engine, max_batch_size=4, max_num_tokens=budget)
    requests = _requests(prompts)
    decoding_during_prefill = []

    def watch(s):
        chunks = plan_chunks(s.running, s.max_num_tokens)
        assert sum(len(t) for _, t, _ in chunks) <= max(budget, len(s.running)), f"seed {SEED}"
        if any(r.prefilling for r, _, _ in chunks) and any(not r.prefilling for r, _, _ in chunks):
            decoding_during_prefill.append(len(chunks))

    steps = _run(scheduler, requests, watch)
    for req in requests:
        logits, tokens = peft_reference[req.adapter]
        assert req.output_ids == tokens, f"seed {SEED}, adapter {req.adapter}"
        torch.testing.assert_close(req.context_logits, logits, atol=2e-4, rtol=1e-4, msg=f"seed {SEED}")
    if budget == 16:
        assert steps >= 150 // 16 + 11 and decoding_during_prefill, steps  # chunked, and decodes went on beside it
    else:
        assert steps == 12 and not decoding_during_prefill


def test_plan_chunks_decodes_first_then_prefills_within_budget():
    def running(prompt_len, position, out=()):
        r = Running(make_request(0, 0, None, list(range(prompt_len)), 8), 0, frozenset(), position)
        r.req.output_ids = list(out)
        return r

    decoding = [running(4, 5, [9]), running(3, 4, [8])]
    long_a, long_b, short = running(100, 0), running(50, 20), running(6, 0)
    # decodes first; the shortest remaining prompt next; the oldest prompt (long_a) keeps a quarter of the budget
    step = plan_chunks([long_a, *decoding, long_b], 40)
    assert [(r, len(t), s) for r, t, s in step] == [(decoding[0], 1, 5), (decoding[1], 1, 4), (long_b, 28, 20),
                                                    (long_a, 10, 0)]
    step = plan_chunks([long_a, long_b, short], 120)
    assert [(r, len(t), s) for r, t, s in step] == [(short, 6, 0), (long_b, 30, 20), (long_a, 84, 0)]
    assert [(len(t), s) for _, t, s in plan_chunks([long_a], 1)] == [(1, 0)]  # a budget of one still progresses
    assert [len(t) for _, t, _ in plan_chunks([*decoding, long_a], 2)] == [1, 1]  # decodes fill it: prefill waits


def test_cancelled_requests_leave_before_the_next_step(engine):
    scheduler = Scheduler(engine, max_batch_size=4)
    keep = make_request(0, "keep", None, [5, 6, 7], 6, end_ids=frozenset())
    gone = make_request(1, "gone", 1, [8, 9, 10, 11], 50, end_ids=frozenset())
    scheduler.add(keep)
    scheduler.add(gone)
    scheduler.step()
    seq = next(r.seq_id for r in scheduler.running if r.req is gone)
    assert seq in engine.model.kv_cache
    gone.client_gone = lambda: True  # e.g. the gRPC deadline passed
    finished = scheduler.step()
    assert [r for r, _ in finished] == [gone] and gone.finish_reason == "cancelled"
    assert len(gone.output_ids) == 1  # no token computed for it after the client left
    assert seq not in engine.model.kv_cache  # freed in the step it left
    _run(scheduler, [])
    assert keep.finish_reason == "length" and len(keep.output_ids) == 6
    last = make_request(2, "last", None, [5, 6], 50, end_ids=frozenset())
    scheduler.add(last)
    scheduler.step()
    last.cancelled = True  # a stop request for the only running sequence
    assert scheduler.step() == [(last, [])] and not scheduler.busy
    assert not engine.model.kv_cache  # freed at once, not with a later request's step


def test_a_cancel_with_a_reason_finishes_with_that_reason(engine):
    """A front end that matched a stop string itself (the OpenAI layer, in on_token) ends the sequence as
    "stop_words", in the step of the token that completed the string or (from another thread) at the next one; a
    plain cancel stays "cancelled"."""
    from trtllm_bdlora.engine.runtime import Runtime

    scheduler = Scheduler(engine, max_batch_size=4)
    in_callback = make_request(0, "in callback", None, [5, 6, 7], 50, end_ids=frozenset())
    in_callback.on_token = lambda token: len(in_callback.output_ids) == 3 and Runtime.cancel(in_callback, "stop_words")
    later = make_request(1, "later", None, [8, 9], 50, end_ids=frozenset())
    plain = make_request(2, "plain", None, [8, 9, 10], 50, end_ids=frozenset())
    for req in (in_callback, later, plain):
        scheduler.add(req)
    for _ in range(3):
        scheduler.step()
    Runtime.cancel(later, "stop_words")
    Runtime.cancel(plain)
    _run(scheduler, [])
    assert (in_callback.finish_reason, len(in_callback.output_ids)) == ("stop_words", 3)
    assert later.finish_reason == "stop_words" and plain.finish_reason == "cancelled"


def test_exception_in_one_request_fails_only_that_request(engine, prompts, peft_reference, monkeypatch):
    import trtllm_bdlora.engine.scheduler as scheduler_module

    real = scheduler_module.sample

    def failing(logits, req, generator, end_ids, allowed=None):
        if req.id == "bad" and len(req.output_ids) == 3:
            raise ZeroDivisionError("forced")
        return real(logits, req, generator, end_ids, allowed)

    monkeypatch.setattr(scheduler_module, "sample", failing)
    scheduler = Scheduler(engine, max_batch_size=4)
    requests = _requests(prompts)
    bad = make_request(9, "bad", 1, [1, 2, 3], 12, end_ids=frozenset())
    _run(scheduler, [*requests, bad])
    assert bad.finish_reason == "error" and log_text(bad.error) == "internal error while serving this request: " \
        "ZeroDivisionError: forced" and len(bad.output_ids) == 3
    assert str(bad.error) == "internal error while serving this request"  # what a client sees: no exception name
    for req in requests:
        assert req.output_ids == peft_reference[req.adapter][1], f"seed {SEED}"
    assert not engine.model.kv_cache  # every sequence freed, the failed one included


def test_a_step_that_cannot_be_planned_fails_its_requests_only(engine, monkeypatch):
    scheduler = Scheduler(engine, max_batch_size=4)
    first = [make_request(i, i, None, [3, 4, 5 + i], 4, end_ids=frozenset()) for i in range(2)]
    real = engine.pool.assign
    monkeypatch.setattr(engine.pool, "assign", lambda adapters: (_ for _ in ()).throw(KeyError("slot table")))
    for req in first:
        scheduler.add(req)
    finished = scheduler.step()
    assert sorted(r.id for r, _ in finished) == [0, 1]
    assert all(log_text(r.error) == "internal error while scheduling: KeyError: 'slot table'" for r in first)
    monkeypatch.setattr(engine.pool, "assign", real)
    again = make_request(5, 5, None, [3, 4, 5], 4, end_ids=frozenset())
    _run(scheduler, [again])
    assert again.finish_reason == "length" and again.output_ids == _tokens_alone(engine, [3, 4, 5], 4)


def _tokens_alone(engine, prompt, n):
    req = make_request(0, 0, None, prompt, n, end_ids=frozenset())
    _run(Scheduler(engine), [req])
    return req.output_ids


def test_access_line_format(capsys):
    import logging

    from trtllm_bdlora.logs import configure_logging, kv, log_request

    assert kv(id="a b", n=3, ms=1.25, adapter=None, e='x="1"') == 'id="a b" n=3 ms=1.2 adapter=- e="x=\\"1\\""'
    req = make_request(4, "req-1", 7, [1, 2, 3], 5, output_ids=[9, 9], times_ns={"arrival": 0, "first_scheduled": 2_000_000})
    configure_logging("warning")
    log_request(req, "ensemble", "length")
    assert capsys.readouterr().err == ""
    configure_logging("info")
    try:
        log_request(req, "ensemble", "error", "internal error: boom")
        line = capsys.readouterr().err.strip()
        assert " INFO trtllm_bdlora.access id=req-1 seq=4 model=ensemble adapter=7 tokens_in=3 tokens_out=2 " \
               "queue_ms=2.0 compute_ms=" in line and line.endswith('outcome=error error="internal error: boom"')
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", line), line
    finally:
        package = logging.getLogger("trtllm_bdlora")
        package.handlers.clear()
        package.setLevel(logging.NOTSET)
        package.propagate = True

"""The TP engine under mpirun equals PEFT per request: logits of a mixed batch, and 16 greedy tokens (also with
chunked prefill, and with prefixes copied between sequences by prefix caching)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO
from trtllm_bdlora.distributed.launch import mpirun_command

PROMPTS = [[5, 17, 3, 99, 42, 7, 1], [8, 8, 200, 31], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [250, 3, 77],
           [9, 90, 190, 33, 4], [11, 12, 13, 14, 15, 16, 99, 5]]  # the last shares 6 tokens with the third


def _cases(bd_adapters, lora_adapter):
    lora = [[7, str(lora_adapter)]]
    bd = [[i + 1, str(d)] for i, d in enumerate(bd_adapters)] + lora  # plain LoRA shares the BD batch
    bd_reqs = [{"adapter": a, "prompt_ids": p} for a, p in zip([1, 2, 3, None, 7], PROMPTS)]
    lora_reqs = [{"adapter": a, "prompt_ids": p} for a, p in zip([7, None, 7, 7], PROMPTS)]
    # prefix caching: whole and partial prompts shared by the same adapter (copied), and by other adapters (not);
    # 3 tokens a step, so later prompts start while earlier ones hold their prefixes
    shared = [(1, 2), (1, 5), (2, 5), (1, 2), (None, 0), (None, 0), (7, 5), (1, 5)]
    prefix_reqs = [{"adapter": a, "prompt_ids": PROMPTS[i], "prompt": i} for a, i in shared]
    return [
        {"name": "bdlora", "scheme": "bdlora", "adapters": bd, "requests": bd_reqs},
        # 3 tokens a step: prompts prefilled in chunks, beside other sequences' decodes
        {"name": "bdlora_chunked", "scheme": "bdlora", "adapters": bd, "requests": bd_reqs, "max_num_tokens": 3},
        {"name": "bdlora_as_slora", "scheme": "slora", "adapters": bd, "requests": bd_reqs},
        {"name": "lora_replicated", "scheme": "replicated", "adapters": lora, "requests": lora_reqs},
        {"name": "lora_slora", "scheme": "slora", "adapters": lora, "requests": lora_reqs},
        {"name": "bdlora_prefix", "scheme": "bdlora", "adapters": bd, "requests": prefix_reqs, "max_num_tokens": 3},
    ]


@pytest.fixture(scope="module")
def peft_reference(tiny_llama, bd_adapters, lora_adapter):
    """Per-request logits and greedy tokens from PEFT's PeftModel: the independent reference."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    dirs = {i + 1: d for i, d in enumerate(bd_adapters)} | {7: lora_adapter}
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), dirs[1], adapter_name="1")
    for task_id, d in dirs.items():
        if task_id != 1:
            model.load_adapter(d, adapter_name=str(task_id))
    model.eval()
    ref = {}
    for task_id in [None, *dirs]:
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                if task_id is None:
                    with model.disable_adapter():
                        logits = model(ids).logits[0]
                        gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
                else:
                    model.set_adapter(str(task_id))
                    logits = model(ids).logits[0]
                    gen = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
            ref[(task_id, i)] = (logits, gen[0, len(prompt):].tolist())
    return ref


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_engine_matches_peft(tp, tiny_llama, bd_adapters, lora_adapter, peft_reference, tmp_path):
    cases = _cases(bd_adapters, lora_adapter)
    assert len(cases[0]["requests"]) == 5
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    argv = [str(tiny_llama), str(tmp_path), str(tmp_path / "cases.json")]
    cmd = mpirun_command(tp, [])[:-3] + [sys.executable, str(REPO / "tests" / "tp_worker.py"), *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    layers = 2
    for case in cases:
        logits = load_file(str(tmp_path / f"{case['name']}.safetensors"))
        outputs = json.loads((tmp_path / f"{case['name']}.json").read_text())
        for i, req in enumerate(case["requests"]):
            want_logits, want_tokens = peft_reference[(req["adapter"], req.get("prompt", i))]
            torch.testing.assert_close(logits[f"req{i}"], want_logits, rtol=1e-4, atol=1e-4)
            assert outputs[i]["output_ids"] == want_tokens, (case["name"], i)
            lora_per_step = outputs[i]["stats"]["last_step"].get("lora", {})
            count = sum(v["count"] for v in lora_per_step.values())
            if case["scheme"] == "slora" and tp > 1:
                assert count == 4 * layers, lora_per_step  # all-gather qkv, gate_up; all-reduce o, down
            else:
                assert count == 0, lora_per_step
            if tp > 1:
                base = outputs[i]["stats"]["last_step"]["base"]["all_reduce"]["count"]
                assert base == 2 * layers
        copies = json.loads((tmp_path / f"{case['name']}.copies.json").read_text())
        reqs = case["requests"]
        for source, target, n in copies:  # only within one adapter, only a prefix both prompts have
            assert reqs[source]["adapter"] == reqs[target]["adapter"], (case["name"], source, target)
            assert 0 < n < len(reqs[target]["prompt_ids"])
            assert reqs[source]["prompt_ids"][:n] == reqs[target]["prompt_ids"][:n]
        if case["name"] == "bdlora_prefix":  # the copies the case is built for happen: partial and whole prompts
            targets = {t for _, t, _ in copies}
            assert {1, 3, 7} <= targets and not {0, 2, 6} & targets, copies  # 2 and 6: alone with their adapter
            assert {(4, 5, 6), (5, 4, 6)} & set(map(tuple, copies)), copies  # a whole prompt but its last token
            assert any(reqs[t]["prompt"] != reqs[s]["prompt"] for s, t, _ in copies), copies  # 6 of 8 tokens


def test_adapters_differ_from_base(peft_reference):
    """Guard against a vacuous comparison: every adapter changes the logits."""
    for task_id in (1, 2, 3, 7):
        base_logits, _ = peft_reference[(None, 0)]
        assert (peft_reference[(task_id, 0)][0] - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_engine_with_adapters_close_to_peft(monkeypatch, native, tiny_llama, bd_adapters, lora_adapter,
                                                     peft_reference):
    """A bfloat16 engine's prompt logits of a mixed-adapter batch within bf16's precision of PEFT's float32 ones
    (1-4.5% relative L2 measured), the LoRA op converting to float32 (decode-sized batches) or multiplying in bf16
    (prefill-sized): each error is a small part of what the adapter changes, so a dropped or misrouted term fails."""
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine
    from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
    from trtllm_bdlora.kernels import lora_cpu

    monkeypatch.setattr(lora_cpu, "NATIVE_MIN_TOKENS", 16 if native else 10**6)
    monkeypatch.setattr(lora_cpu, "onednn_fast", lambda dtype: True)  # both paths on any CPU (slow ones too)
    reqs = _cases(bd_adapters, lora_adapter)[0]
    engine = Engine(Comm(0, 1, torch.device("cpu")), str(tiny_llama), "bdlora", [tuple(a) for a in reqs["adapters"]],
                    max_loras=4, dtype="bfloat16")
    adapters = [r["adapter"] for r in reqs["requests"]]
    loads, slots = engine.pool.assign(adapters)
    prompts = PROMPTS[: len(adapters)]
    chunks = [SeqChunk(i, p, 0, s) for i, (p, s) in enumerate(zip(prompts, slots))]
    assert lora_cpu._native(torch.empty(sum(map(len, prompts)), 1, dtype=torch.bfloat16)) == native
    logits = engine.lead(StepPlan(loads=loads, chunks=chunks, all_logits=True)).split([len(p) for p in prompts])
    bound = 8 * torch.finfo(torch.bfloat16).eps  # 6%: two layers of bf16 weights, activations and adapters
    for i, (got, task_id) in enumerate(zip(logits, adapters)):
        want = peft_reference[(task_id, i)][0]
        error = float((got - want).norm() / want.norm())
        assert error < bound, (i, task_id, error)
        if task_id is not None:  # these random adapters change the logits by about their own size
            effect = float((want - peft_reference[(None, i)][0]).norm() / want.norm())
            assert error < effect / 20, (i, task_id, error, effect)

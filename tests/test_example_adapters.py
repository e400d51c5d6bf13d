"""The shipped smollm2-135m adapters: load, comm_free at TP 3; on held-out prompts in both request forms (chat
`messages` and plain `prompt`), the same greedy outputs as PEFT through `generate` at TP 3, accuracy >= 90% where
the base model scores <= 10%; and `serve` + the tritonclient client answer plain text as `generate` does."""

import json
import sys

import pytest

from tests.helpers import REPO, run_cli

sys.path.insert(0, str(REPO / "examples"))
import evaluate  # noqa: E402
from tasks import FORMS, TASKS, examples  # noqa: E402

from trtllm_bdlora.adapters import load_peft_adapter  # noqa: E402
from trtllm_bdlora.llama.loader import load_model_config  # noqa: E402

N = 20
SERVED_PER_TASK = 4


@pytest.mark.parametrize("task", TASKS)
def test_adapter_loads_and_is_comm_free_at_tp3(task):
    directory = REPO / "examples" / "adapters" / task
    assert (directory / "adapter_model.safetensors").stat().st_size < 10 * 2**20
    adapter = load_peft_adapter(directory, model_shape=load_model_config("smollm2-135m"))
    assert adapter.kind == "bdlora" and adapter.nblocks == 3
    res = run_cli("inspect", str(directory), "--tp", "3", "--model", "smollm2-135m", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["comm_free"] is True
    assert "python examples/train_bdlora.py" in (directory / "README.md").read_text()


def test_heldout_is_disjoint_from_training():
    for task in TASKS:
        train = {p for p, _ in examples(task, "train", 2000)}
        assert not train & {p for p, _ in examples(task, "heldout", N)}


@pytest.fixture(scope="module")
def runs():
    requests = evaluate.requests_for(N)
    ours = evaluate.run_generate(requests, tp=3)
    peft = evaluate.peft_outputs(requests)
    return requests, ours, peft


def test_requests_cover_both_forms_with_and_without_adapter(runs):
    requests, ours, _ = runs
    assert len(ours) == len(requests) == len(TASKS) * N * len(FORMS) * 2
    assert {(r["form"], r["adapter"] is None) for r in requests} == {(f, b) for f in FORMS for b in (True, False)}
    assert all(("messages" in r) == (r["form"] == "chat") and ("prompt" in r) == (r["form"] == "plain") for r in requests)


def test_generate_tp3_equals_peft(runs):
    requests, ours, peft = runs
    for req, out, want in zip(requests, ours, peft):
        if req["adapter"]:
            assert out["output_ids"] == want, (req["task"], req["form"], req["answer"], out["text"])


def test_accuracy_adapters_vs_base_in_both_forms(runs):
    from transformers import AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir

    requests, ours, peft = runs
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    adapter_acc = evaluate.accuracy(requests, [o["text"] for o in ours])
    base_acc = evaluate.accuracy(requests, [tokenizer.decode(ids, skip_special_tokens=True) for ids in peft])
    print("exact match, adapter (generate TP 3) / base (PEFT):",
          {f"{t} ({f})": (adapter_acc[(t, f)]["adapter"], base_acc[(t, f)]["base"]) for t in TASKS for f in FORMS})
    for task in TASKS:
        for form in FORMS:
            assert base_acc[(task, form)]["base"] <= 0.10, (task, form, base_acc)
            assert adapter_acc[(task, form)]["adapter"] >= 0.90, (task, form, adapter_acc)


def test_serve_and_client_answer_plain_text_as_generate(runs):
    requests, ours, _ = runs
    picked = [(r, o) for r, o in zip(requests, ours) if r["form"] == "plain"]
    picked = [pair for task in TASKS for pair in [p for p in picked if p[0]["task"] == task][: 2 * SERVED_PER_TASK]]
    texts = evaluate.run_serve([r for r, _ in picked], tp=3)
    for (req, out), text in zip(picked, texts):
        assert text == out["text"], (req["task"], req["adapter"], text, out["text"])
    served = [(r, t) for (r, _), t in zip(picked, texts) if r["adapter"]]
    assert sum(t.strip() == r["answer"] for r, t in served) >= 0.9 * len(served)

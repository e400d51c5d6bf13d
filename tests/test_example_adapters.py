"""The shipped smollm2-135m adapters: load, comm_free at TP 3, same greedy outputs as PEFT through `generate`
at TP 3 on held-out prompts, accuracy >= 90% where the base model scores <= 10%."""

import json
import sys

import pytest

from tests.helpers import REPO, run_cli

sys.path.insert(0, str(REPO / "examples"))
import evaluate  # noqa: E402
from tasks import TASKS, examples  # noqa: E402

from trtllm_bdlora.adapters import load_peft_adapter  # noqa: E402
from trtllm_bdlora.models.loader import load_model_config  # noqa: E402

N = 20


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
    adapter_requests = [r for r in evaluate.requests_for(N) if r["adapter"]]
    base_requests = [r for r in evaluate.requests_for(N) if not r["adapter"]]
    ours = evaluate.run_generate(adapter_requests, tp=3)
    peft_adapter = evaluate.peft_outputs(adapter_requests)
    peft_base = evaluate.peft_outputs(base_requests)
    return adapter_requests, base_requests, ours, peft_adapter, peft_base


def test_generate_tp3_equals_peft(runs):
    adapter_requests, _, ours, peft_adapter, _ = runs
    assert len(ours) == len(adapter_requests) == 3 * N
    for req, out, want in zip(adapter_requests, ours, peft_adapter):
        assert out["output_ids"] == want, (req["task"], req["answer"], out["text"])


def test_accuracy_adapters_vs_base(runs):
    from transformers import AutoTokenizer

    from trtllm_bdlora.models.loader import embedded_model_dir

    adapter_requests, base_requests, ours, _, peft_base = runs
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    adapter_acc = evaluate.accuracy(adapter_requests, [o["text"] for o in ours])
    base_acc = evaluate.accuracy(base_requests, [tokenizer.decode(ids, skip_special_tokens=True) for ids in peft_base])
    for task in TASKS:
        assert base_acc[task]["base"] <= 0.10, (task, base_acc)
        assert adapter_acc[task]["adapter"] >= 0.90, (task, adapter_acc)

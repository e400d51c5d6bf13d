"""examples/parity.py: PEFT's rank matching and parameter counts checked against PEFT itself, and the `--quick`
run end to end (training, PEFT and TP-3 serving-path evaluation, their agreement, table and figure)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "examples"))
import parity  # noqa: E402

from trtllm_bdlora.adapters import load_peft_adapter  # noqa: E402
from trtllm_bdlora.llama.loader import load_model_config  # noqa: E402
from trtllm_bdlora.llama.shape import LlamaShape  # noqa: E402


def _peft_trainable(shape: LlamaShape, rank: int, nblocks: int | None) -> int:
    from peft import get_peft_model
    from training import lora_config
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                         num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim)
    return get_peft_model(LlamaForCausalLM(config), lora_config(rank, nblocks)).get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("rank,nblocks", [(4, None), (8, None), (6, 3), (12, 3), (9, 3)])
def test_param_count_equals_peft(rank, nblocks):
    shape = LlamaShape(hidden_size=96, intermediate_size=192, num_layers=2, num_heads=6, num_kv_heads=3, head_dim=16)
    assert parity.adapter_params(shape, rank, nblocks) == _peft_trainable(shape, rank, nblocks)


def test_matched_ranks_follow_peft_rule():
    """Largest multiple of nblocks whose BD-LoRA count is at or below the LoRA's; one step more exceeds it."""
    shape = load_model_config("smollm2-135m")
    got = {r: parity.matched_bd_rank(shape, r, 3) for r in (4, 8, 16, 32)}
    assert got == {4: 6, 8: 12, 16: 24, 32: 51}
    for lora_rank, bd_rank in got.items():
        budget = parity.adapter_params(shape, lora_rank)
        assert bd_rank % 3 == 0
        assert parity.adapter_params(shape, bd_rank, 3) <= budget < parity.adapter_params(shape, bd_rank + 3, 3)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    res = subprocess.run([sys.executable, str(REPO / "examples" / "parity.py"), "--quick", "--output", str(out),
                          "--add-lr", "0.004"],
                         capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_results_table_and_figure(quick_run):
    out, results = quick_run
    assert results["quick"] is True and results["settings"]["seeds"] == [0]
    assert results["settings"]["add_lr"] == 0.004 and {r["lr"] for r in results["runs"] if r["task"] == "add"} == {0.004}
    png = (out / "parity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300 * 1024
    table = (out / "table.md").read_text()
    assert "| LoRA | 4 | 1,221,120 |" in table and "| BD-LoRA | 6 | 1,094,400 |" in table
    assert {(r["task"], r["method"]) for r in results["runs"]} == {(t, m) for t in parity.TASKS for m in parity.METHODS}
    for run in results["runs"]:
        for path in ("peft", "engine"):
            score = run["scores"][path]
            assert (score > 1.0 and score < 1e6) if run["task"] == "lm" else 0.0 <= score <= 1.0


def test_quick_run_bd_adapters_have_nblocks_and_matched_params(quick_run):
    out, results = quick_run
    shape = load_model_config("smollm2-135m")
    by_key = {(r["task"], r["method"], r["seed"], r["lora_rank"]): r for r in results["runs"]}
    for (task, method, seed, lora_rank), run in by_key.items():
        directory = out / "adapters" / run["name"]
        config = json.loads((directory / "adapter_config.json").read_text())
        adapter = load_peft_adapter(directory, model_shape=shape)
        assert adapter.num_params() == run["params"] == parity.adapter_params(
            shape, run["rank"], 3 if method == "bdlora" else None)
        assert len(adapter.target_modules) == 7
        if method == "lora":
            assert adapter.kind == "lora" and not config.get("use_bdlora")
            continue
        assert adapter.kind == "bdlora" and adapter.nblocks == 3 and config["use_bdlora"]["nblocks"] == 3
        lora = by_key[(task, "lora", seed, lora_rank)]
        assert run["params"] <= lora["params"] < parity.adapter_params(shape, run["rank"] + 3, 3)


def test_quick_run_engine_agrees_with_peft(quick_run):
    _, results = quick_run
    assert results["agreement"]["problems"] == []
    assert set(results["base"]["peft"]) == set(results["base"]["engine"]) == {"lm", "add"}
    ppl_peft, ppl_engine = results["base"]["peft"]["lm"], results["base"]["engine"]["lm"]
    assert abs(ppl_engine / ppl_peft - 1) <= parity.PPL_RTOL


def test_report_merges_a_rerun_task():
    """parity_report's merge: the later run's task replaces the earlier run's runs, base score and task settings,
    and keeps the other task and every part's command."""
    import parity_report

    def part(tasks, lr, score, command):
        runs = [{"task": t, "method": m, "rank": 4, "seed": 0, "params": 1, "scores": {"peft": score, "engine": score}}
                for t in tasks for m in ("lora", "bdlora")]
        return {"settings": {"tasks": list(tasks), "seeds": [0], "lm_lr": lr, "add_lr": lr}, "runs": runs,
                "base": {s: {t: score / 2 for t in tasks} for s in ("peft", "engine")}, "command": command,
                "date": "d", "seconds": {"total": 1.0}, "agreement": {"problems": []}}

    merged = parity_report.merge_results([("a", part(["lm", "add"], 3e-3, 10.0, "first")),
                                          ("b", part(["add"], 1e-3, 0.5, "second"))])
    assert sorted((r["task"], r["scores"]["peft"]) for r in merged["runs"]) == [("add", 0.5)] * 2 + [("lm", 10.0)] * 2
    assert merged["base"]["engine"] == {"lm": 5.0, "add": 0.25}
    assert merged["settings"]["add_lr"] == 1e-3 and merged["settings"]["lm_lr"] == 3e-3
    assert merged["settings"]["tasks"] == ["lm", "add"]
    assert [p["command"] for p in merged["parts"]] == ["first", "second"]

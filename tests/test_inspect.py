"""`trtllm-bdlora inspect` on PEFT-made adapters."""

import json

from tests.helpers import run_cli


def test_inspect_bdlora_tp8_comm_free(bd_adapters):
    res = run_cli("inspect", str(bd_adapters[0]), "--tp", "8", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["kind"] == "bdlora" and report["rank"] == 16 and report["nblocks"] == 8
    assert report["comm_free"] is True and report["reasons"] == []
    roles = {m["name"]: (m["role"], m["block_diagonal"]) for m in report["modules"]}
    assert roles["q_proj"] == ("column", "B") and roles["down_proj"] == ("row", "A")
    schemes = report["schemes"]
    total = report["params"]
    assert sum(schemes["bdlora"]["per_rank_params"]) == total  # BD: each parameter lives on exactly one rank
    assert max(schemes["bdlora"]["per_rank_params"]) < max(schemes["replicated"]["per_rank_params"])
    assert schemes["bdlora"]["lora_collectives_per_layer"] == 0
    assert schemes["slora"]["lora_collectives_per_layer"] == 4


def test_inspect_tp3_not_comm_free(bd_adapters, tiny_llama):
    res = run_cli("inspect", str(bd_adapters[0]), "--tp", "3", "--json")
    # the tiny model's 8 heads cannot be split 3 ways: a clear error, exit 2
    assert res.returncode == 2 and "does not divide" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_inspect_tp3_reason(tmp_path):
    from tests.helpers import make_peft_adapter, make_tiny_llama

    base = make_tiny_llama(tmp_path / "base12", heads=12, kv_heads=12, hidden=192)
    adapter = make_peft_adapter(base, tmp_path / "bd8", seed=3, r=16, nblocks=8)
    res = run_cli("inspect", str(adapter), "--tp", "3", "--json", "--model", str(base))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["comm_free"] is False
    assert any("nblocks=8 is not a multiple of tp=3" in r for r in report["reasons"])
    text = run_cli("inspect", str(adapter), "--tp", "3").stdout
    assert "comm_free = false" in text and "why not" in text


def test_inspect_plain_lora(lora_adapter):
    report = json.loads(run_cli("inspect", str(lora_adapter), "--tp", "2", "--json").stdout)
    assert report["kind"] == "lora" and report["comm_free"] is False
    assert "replicated" in report["reasons"][0]


def test_inspect_invalid_adapter(tmp_path):
    res = run_cli("inspect", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "adapter_config.json" in res.stderr

"""`trtllm-bdlora bench` stays runnable on CPU and reports the LoRA collectives per step."""

from tests.helpers import run_cli


def test_bench_table(tiny_llama):
    res = run_cli("bench", "--model", str(tiny_llama), "--tp", "2", "--steps", "3", "--batch", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[2:]}
    assert set(rows) == {"none", "bdlora", "slora", "replicated"}
    assert rows["bdlora"][-1] == "0" and rows["replicated"][-1] == "0"
    assert rows["slora"][-1] == "8"  # 4 per decoder layer, 2 layers
    assert all(float(r[1]) > 0 for r in rows.values())


def test_cpu_validate_profile(tiny_llama, tmp_path):
    """The validation's compute measurement runs with bench's current options (it broke once when bench gained
    --max-lora-rank) and its categories add up to the measured step."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "profile.json"
    res = subprocess.run([sys.executable, "-m", "trtllm_bdlora", "cpu-validate", "--profile-only", "--model",
                          str(tiny_llama), "--tp", "1", "2", "--steps", "2", "--batch", "4", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    profile = json.loads(out.read_text())
    for tp in ("tp1", "tp2"):
        assert set(profile[tp]) == {"none", "bdlora", "slora", "replicated"}
        for scheme, row in profile[tp].items():
            parts = row["base_gemm"] + row["lora"] + row["attention"] + row["other"]
            assert row["total"] > 0 and parts >= row["total"] * 0.999, (tp, scheme, row)
            assert (row["lora"] > 0) == (scheme != "none"), (tp, scheme, row)

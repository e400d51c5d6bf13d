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

"""benchmarks/kernel_bench.py stays runnable without a GPU (tiny shapes, interpreter)."""

import json
import subprocess
import sys

from tests.helpers import REPO


def test_kernel_bench_smoke(tmp_path):
    out = tmp_path / "kb.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_bench.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    meta, rows = result[0], result[1:]
    assert meta["smoke"] is True and len(rows) == 7 * 2 * 2
    assert {r["module"] for r in rows} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(r["bdlora_us"] > 0 and r["base_gemm_us"] > 0 for r in rows)
    assert "| llama-3.1-8b | q_proj |" in res.stdout

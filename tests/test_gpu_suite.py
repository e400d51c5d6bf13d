"""benchmarks/gpu_suite.py --smoke: the GPU suite's own code on CPU (tiny shapes, Triton interpreter) checks itself."""

import json
import subprocess
import sys

from tests.helpers import REPO

SUITE = str(REPO / "benchmarks" / "gpu_suite.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SUITE, "--smoke", *args], capture_output=True, text=True, timeout=900,
                          cwd=REPO)


def test_gpu_suite_smoke(tmp_path):
    res = _run("--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["meta"]["smoke"] is True and result["complete"]
    assert result["roofline"]["copy_gbs"] > 0 and result["roofline"]["bf16_gemm_tflops"] > 0
    rows = result["kernels"]
    assert {r["module"] for r in rows} == {"q_proj", "down_proj"} and {r["dtype"] for r in rows} == {"float16", "bfloat16"}
    for r in rows:  # every scheme's kernels and both baselines were checked and timed
        assert r["worst_err_over_tol"] <= 1
        for key in ("base_gemm_us", "bdlora_r16_us", "bdlora2x_r16_us", "replicated_r16_us", "slora_r16_us", "bgmv_r16_us",
                    "loop_r16_us"):
            assert r[key] > 0, key
    checks = [e for e in result["kernel_times"] if "rel_err" in e]
    assert result["checks"]["passed"] == result["checks"]["total"] == len(checks) > 0
    engine = result["engine"]
    assert len(engine["checks"]) == 9 and all(c["ok"] and c["max_rel_err"] < 1e-3 for c in engine["checks"])
    by_tp = {rep["tp"]: rep["schemes"] for rep in engine["step_times"]}
    assert by_tp[2]["slora"]["lora_collectives"] == 8 and by_tp[2]["bdlora"]["lora_collectives"] == 0
    assert "| llama-3.1-8b | q_proj |" in (tmp_path / "gpu_suite.md").read_text()


def test_gpu_suite_fails_on_a_wrong_kernel(tmp_path):
    """The suite's comparisons bite: a perturbed kernel result makes it exit non-zero and report the failures."""
    res = _run("--out", str(tmp_path), "--skip-engine", "--inject-error")
    assert res.returncode == 1, res.stdout[-2000:]
    assert "correctness checks FAILED" in res.stderr
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["checks"]["passed"] < result["checks"]["total"]

"""Ahead-of-time build: PTX and compilable C for sm_80 and sm_90 on a machine without a GPU."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_cli

CUDA_INCLUDE = Path("/usr/local/cuda/include")


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    res = run_cli("aot", "--output", str(out), "--arch", "sm_80,sm_90", "--dtype", "bfloat16,float32",
                  "--block-r", "16,32")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_ptx_per_arch(aot_dir):
    for arch, target in ((80, "sm_80"), (90, "sm_90a")):
        for dtype in ("bf16", "fp32"):
            ptx = (aot_dir / f"bdlora_{dtype}_sm{arch}_r16.ptx").read_text()
            assert re.search(rf"^\.target {target}\b", ptx, re.M)
            entry = ptx[ptx.index(".entry"): ptx.index(")", ptx.index(".entry"))]
            assert entry.count(".param") == 17  # 15 kernel arguments + Triton's 2 scratch pointers


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas not installed")
def test_ptx_assembles_with_cuda_ptxas(aot_dir, tmp_path):
    for arch, sm in ((80, "sm_80"), (90, "sm_90a")):
        subprocess.run(["ptxas", f"-arch={sm}", str(aot_dir / f"bdlora_bf16_sm{arch}_r32.ptx"), "-o",
                        str(tmp_path / f"{arch}.cubin")], check=True)


@pytest.mark.skipif(not (CUDA_INCLUDE / "cuda.h").is_file(), reason="CUDA headers not installed")
def test_c_source_compiles(aot_dir, tmp_path):
    obj = tmp_path / "bdlora_kernels.o"
    subprocess.run(["gcc", "-c", "-std=c99", "-Wall", "-Werror", f"-I{CUDA_INCLUDE}", str(aot_dir / "bdlora_kernels.c"),
                    "-o", str(obj)], check=True)
    symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    assert " T bdlora_launch" in symbols and " T bdlora_has_variant" in symbols
    source = (aot_dir / "bdlora_kernels.c").read_text()
    assert source.count('"bdlora_fused_kernel"') == 8  # 2 archs x 2 dtypes x 2 rank tiles


def test_aot_argument_errors(tmp_path):
    res = run_cli("aot", "--output", str(tmp_path), "--dtype", "int8")
    assert res.returncode == 2 and "unknown dtype 'int8'" in res.stderr
    res = run_cli("aot", "--output", str(tmp_path), "--block-r", "12")
    assert res.returncode == 2 and "powers of two" in res.stderr


def test_toolchain_recorded_and_pinned_triton_enforced(aot_dir, monkeypatch, capsys):
    import json

    import triton

    from trtllm_bdlora.cli import main
    from trtllm_bdlora.versions import TRITON_KERNEL_COMPILER

    manifest = json.loads((aot_dir / "manifest.json").read_text())
    assert manifest["triton"] == triton.__version__ and "CUDA" in manifest["ptxas"]
    assert f"// triton: {triton.__version__}" in (aot_dir / "bdlora_kernels.c").read_text()
    monkeypatch.setattr("trtllm_bdlora.kernels.aot.installed_triton_version", lambda: "3.5.1")
    assert main(["aot", "--output", str(aot_dir / "no"), "--require-pinned-triton"]) == 2
    err = capsys.readouterr().err
    assert f"triton 3.5.1 is not the pinned kernel compiler {TRITON_KERNEL_COMPILER}" in err
    assert not (aot_dir / "no").exists()

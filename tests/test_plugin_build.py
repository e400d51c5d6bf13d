"""The plugin's host logic builds with CMake/g++ and passes its unit test; the whole plugin compiles
against TensorRT headers when TRT_INCLUDE_DIR points at them (fetched, never committed)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli

PLUGINS = REPO / "plugins"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_host_logic_unit_test_cmake(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build), "-DBDLORA_HOST_ONLY=ON"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    res = subprocess.run([str(build / "test_bdlora_host")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    assert "all checks passed" in res.stdout


def test_host_logic_unit_test_gpp(tmp_path):
    exe = tmp_path / "test_bdlora_host"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{PLUGINS / 'include'}",
                    str(PLUGINS / "src" / "bdlora_host.cpp"), str(PLUGINS / "tests" / "test_bdlora_host.cpp"),
                    "-o", str(exe)], check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0 and "all checks passed" in res.stdout, res.stdout


TRT_INCLUDE = Path(os.environ.get("TRT_INCLUDE_DIR", "/nonexistent"))
CUDA_INCLUDE = Path("/usr/local/cuda/include")


@pytest.mark.skipif(not (TRT_INCLUDE / "NvInfer.h").is_file() or not (CUDA_INCLUDE / "cuda.h").is_file(),
                    reason="set TRT_INCLUDE_DIR to TensorRT's include/ (public TensorRT repo, tag v10.13.2)")
def test_plugin_compiles_against_tensorrt_headers(tmp_path):
    res = run_cli("aot", "--output", str(tmp_path / "k"), "--arch", "sm_90", "--dtype", "float16", "--block-r", "16")
    assert res.returncode == 0, res.stderr
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fPIC", "-c", f"-I{PLUGINS / 'include'}",
                    f"-I{tmp_path / 'k'}", "-isystem", str(TRT_INCLUDE), "-isystem", str(CUDA_INCLUDE),
                    str(PLUGINS / "src" / "bdlora_plugin.cpp"), "-o", str(tmp_path / "plugin.o")], check=True)

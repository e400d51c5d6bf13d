"""The plugin's host logic builds with CMake/g++ and passes its unit test; the whole plugin compiles
against TensorRT headers when TRT_INCLUDE_DIR points at them (fetched, never committed)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli
from trtllm_bdlora.versions import TENSORRT_HEADERS_TAG, TENSORRT_VERSION

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
CUDA_INCLUDE = Path(os.environ.get("CUDA_INCLUDE_DIR", "/usr/local/cuda/include"))


@pytest.mark.skipif(not (TRT_INCLUDE / "NvInfer.h").is_file() or not (CUDA_INCLUDE / "cuda.h").is_file(),
                    reason=f"set TRT_INCLUDE_DIR to TensorRT's include/ (public TensorRT repo, tag {TENSORRT_HEADERS_TAG})")
def test_plugin_compiles_against_tensorrt_headers(tmp_path):
    """The whole plugin, -Werror, against the pinned TensorRT's headers, linked into a shared library whose only
    undefined symbols are CUDA calls and TensorRT's plugin registry."""
    version = (TRT_INCLUDE / "NvInferVersion.h").read_text()
    assert all(f"_ENTERPRISE {part}" in version for part in TENSORRT_VERSION.split(".")), "headers of another TensorRT"
    res = run_cli("aot", "--output", str(tmp_path / "k"), "--arch", "sm_90", "--dtype", "float16,bfloat16",
                  "--block-r", "16")
    assert res.returncode == 0, res.stderr
    flags = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-fPIC", "-c", f"-I{PLUGINS / 'include'}", f"-I{tmp_path / 'k'}",
             "-isystem", str(TRT_INCLUDE), "-isystem", str(CUDA_INCLUDE)]
    objects = []
    for src in (PLUGINS / "src" / "bdlora_plugin.cpp", PLUGINS / "src" / "bdlora_host.cpp"):
        objects.append(tmp_path / f"{src.stem}.o")
        subprocess.run(["g++", *flags, str(src), "-o", str(objects[-1])], check=True)
    objects.append(tmp_path / "kernels.o")
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-fPIC", "-c", "-isystem", str(CUDA_INCLUDE),
                    str(tmp_path / "k" / "bdlora_kernels.c"), "-o", str(objects[-1])], check=True)
    lib = tmp_path / "libtrtllm_bdlora_plugin.so"
    subprocess.run(["g++", "-shared", *map(str, objects), "-o", str(lib)], check=True)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True).stdout
    # versioned symbols come from libc / libstdc++; the unversioned ones must be CUDA's and TensorRT's registry
    ours = {line.split()[-1] for line in undefined.splitlines() if "@" not in line and not line.split()[-1].startswith("_")}
    assert ours == {"cuCtxGetDevice", "cuDeviceGetAttribute", "cuFuncSetAttribute", "cuLaunchKernel", "cuModuleGetFunction",
                    "cuModuleLoadData", "cudaMemcpyAsync", "cudaMemsetAsync", "getPluginRegistry"}, ours

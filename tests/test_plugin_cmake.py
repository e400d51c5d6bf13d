"""CMake finds TensorRT where the containers install it (TRT_ROOT, /usr/local/tensorrt, the distribution layout),
in that order, and refuses a TensorRT other than the pinned one; fake include/lib trees stand in for each."""

import shutil
import subprocess

import pytest

from tests.helpers import REPO
from trtllm_bdlora.versions import TENSORRT_VERSION

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")


def fake_tensorrt(include, lib, version=TENSORRT_VERSION):
    major, minor, patch, build = version.split(".")
    include.mkdir(parents=True)
    lib.mkdir(parents=True)
    (include / "NvInfer.h").write_text("// fake\n")
    (include / "NvInferVersion.h").write_text(
        f"#define TRT_MAJOR_ENTERPRISE {major}\n#define TRT_MINOR_ENTERPRISE {minor}\n"
        f"#define TRT_PATCH_ENTERPRISE {patch}\n#define TRT_BUILD_ENTERPRISE {build}\n"
        "#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE\n")
    (lib / "libnvinfer.so").write_bytes(b"")


def configure(tmp_path, *defines, env_root=None):
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(find_trt NONE)\n"
        f"include({REPO / 'plugins' / 'cmake' / 'FindTensorRTForBdLora.cmake'})\n")
    build = tmp_path / f"build{len(list(tmp_path.glob('build*')))}"
    env = {"PATH": "/usr/bin:/bin"}
    if env_root:
        env["TRT_ROOT"] = str(env_root)
    res = subprocess.run(["cmake", "-S", str(project), "-B", str(build), *defines], capture_output=True, text=True,
                         env=env)
    res.stderr = " ".join(res.stderr.split())  # CMake wraps its messages
    return res


def test_each_container_location(tmp_path):
    root, local, system = tmp_path / "trt_root", tmp_path / "local_trt", tmp_path / "usr"
    none = [f"-DTENSORRT_LOCAL_PREFIX={tmp_path / 'absent'}", f"-DTENSORRT_SYSTEM_PREFIX={tmp_path / 'absent'}"]
    res = configure(tmp_path, *none)
    assert res.returncode != 0 and "TensorRT not found" in res.stderr and "set TRT_ROOT" in res.stderr

    fake_tensorrt(system / "include" / "x86_64-linux-gnu", system / "lib" / "x86_64-linux-gnu")
    res = configure(tmp_path, f"-DTENSORRT_LOCAL_PREFIX={tmp_path / 'absent'}", f"-DTENSORRT_SYSTEM_PREFIX={system}")
    assert res.returncode == 0, res.stderr
    assert f"TensorRT {TENSORRT_VERSION} (pinned {TENSORRT_VERSION}): {system}/include/x86_64-linux-gnu" in res.stdout

    fake_tensorrt(local / "include", local / "lib")
    res = configure(tmp_path, f"-DTENSORRT_LOCAL_PREFIX={local}", f"-DTENSORRT_SYSTEM_PREFIX={system}")
    assert res.returncode == 0 and f": {local}/include, {local}/lib/libnvinfer.so" in res.stdout

    fake_tensorrt(root / "include", root / "lib64")
    res = configure(tmp_path, f"-DTENSORRT_LOCAL_PREFIX={local}", f"-DTENSORRT_SYSTEM_PREFIX={system}", env_root=root)
    assert res.returncode == 0 and f": {root}/include, {root}/lib64/libnvinfer.so" in res.stdout
    res = configure(tmp_path, f"-DTRT_ROOT={root}", *none)
    assert res.returncode == 0 and f": {root}/include" in res.stdout


def test_other_tensorrt_version_is_refused(tmp_path):
    old = tmp_path / "old"
    fake_tensorrt(old / "include", old / "lib", version="10.11.0.33")
    res = configure(tmp_path, f"-DTRT_ROOT={old}")
    assert res.returncode != 0 and f"TensorRT 10.11.0.33 at {old}/include is not the pinned {TENSORRT_VERSION}" in res.stderr
    res = configure(tmp_path, f"-DTRT_ROOT={old}", "-DBDLORA_ALLOW_TRT_VERSION_MISMATCH=ON")
    assert res.returncode == 0 and "is not the pinned" in res.stderr

"""Issue 22 defect 3: `fill-model-repo` from a non-editable install wrote Python models without model.py. The
models' code now lives in the package (trtllm_bdlora/trtllm/python_models/) and fill-model-repo writes a one-line
model.py importing it. Shown with a wheel built from the package sources (`pip wheel`), installed into a fresh
virtualenv: the repository it writes is complete and each model.py resolves to the installed package."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.serving.repository.spec import MODELS
from trtllm_bdlora.trtllm import triton_repo
from trtllm_bdlora.trtllm.triton_repo import fill_model_repo, missing_files, python_model_source

PYTHON_MODELS = sorted(name for name, model in MODELS.items() if model.backend == "python")
PARAMS = {"engine_dir": "/engines/x", "tokenizer_dir": "/models/y", "tp_size": "2"}

# load every model.py of a repository as Triton's Python backend does (a module from the file, then its
# TritonPythonModel), with a stand-in for the backend's utilities; print where each class comes from
LOAD_MODELS = textwrap.dedent("""
    import importlib.util, inspect, json, sys, types
    import trtllm_bdlora
    sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    repo, found = sys.argv[1], {"package": trtllm_bdlora.__file__}
    for name in sys.argv[2:]:
        spec = importlib.util.spec_from_file_location(f"model_{name}", f"{repo}/{name}/1/model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[name] = inspect.getfile(module.TritonPythonModel)
    print(json.dumps(found))
""")

pytestmark = pytest.mark.route


def clean_env() -> dict[str, str]:
    """No PYTHONPATH: the virtualenv must find the package it installed, not this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A wheel of the package sources alone (what `pip wheel .` packs), installed into a new virtualenv that
    sees this interpreter's site-packages for the dependencies (torch is not reinstalled)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "trtllm_bdlora", src / "trtllm_bdlora", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(root / "dist"), "--no-deps",
                    "--no-build-isolation", "-q"], check=True, cwd=root, env=clean_env())
    wheels = list((root / "dist").glob("trtllm_bdlora-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheels[0])],
                   check=True, cwd=root, env=clean_env(), capture_output=True)
    return root, venv


def test_filled_from_a_wheel_install(wheel_venv):
    root, venv = wheel_venv
    repo = root / "repo"
    done = subprocess.run([str(venv / "bin" / "trtllm-bdlora"), "fill-model-repo", "--engine-dir", "/engines/x",
                           "--tokenizer-dir", "/models/y", "--tp", "2", "--output", str(repo)],
                          capture_output=True, text=True, cwd=root, env=clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODELS)
    assert missing_files(repo) == []
    for name in MODELS:
        assert (repo / name / "config.pbtxt").is_file() and (repo / name / "1").is_dir()
    for name in PYTHON_MODELS:
        assert (repo / name / "1" / "model.py").read_text() == python_model_source(name)
    loaded = subprocess.run([str(venv / "bin" / "python"), "-c", LOAD_MODELS, str(repo), *PYTHON_MODELS],
                            capture_output=True, text=True, cwd=root, env=clean_env(), timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    found = json.loads(loaded.stdout)
    site = str(venv / "lib")
    assert found.pop("package").startswith(site)  # the wheel's copy, not this checkout
    assert sorted(found) == PYTHON_MODELS
    for name, path in found.items():
        assert path.startswith(site) and path.endswith(f"trtllm_bdlora/trtllm/python_models/{name}.py"), (name, path)


def test_model_repo_holds_what_fill_model_repo_writes(tmp_path):
    """The checkout's model_repo/ is the written model.py files, nothing else (README aside)."""
    filled = fill_model_repo(tmp_path / "repo", PARAMS)
    checked_in = sorted(p.relative_to(REPO / "model_repo").as_posix() for p in (REPO / "model_repo").rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts and p.name != "README.md")
    # and tensorrt_llm's, which fill-model-repo writes for a `build --backend torch` directory (issue 22)
    assert checked_in == sorted(f"{name}/1/model.py" for name in (*PYTHON_MODELS, "tensorrt_llm"))
    for name in PYTHON_MODELS:
        assert (REPO / "model_repo" / name / "1" / "model.py").read_text() == (filled / name / "1" / "model.py").read_text()
    assert (REPO / "model_repo" / "tensorrt_llm" / "1" / "model.py").read_text() == python_model_source("tensorrt_llm")


def test_missing_python_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(triton_repo, "PYTHON_MODELS", "trtllm_bdlora.trtllm.no_such_models")
    with pytest.raises(BdLoraError, match=r"^preprocessing: no Python model trtllm_bdlora\.trtllm\.no_such_models\."
                                          r"preprocessing in the installed trtllm_bdlora \(.*\): reinstall the package$"):
        fill_model_repo(tmp_path / "repo", PARAMS)
    assert not (tmp_path / "repo").exists()  # refused before anything is written


def test_incomplete_repository_is_named(tmp_path):
    repo = fill_model_repo(tmp_path / "repo", PARAMS)
    (repo / "tensorrt_llm_bls" / "1" / "model.py").unlink()
    (repo / "ensemble" / "config.pbtxt").unlink()
    assert missing_files(repo) == [str(repo / "ensemble" / "config.pbtxt"), str(repo / "tensorrt_llm_bls" / "1" / "model.py")]


def test_torch_build_filled_from_a_wheel_install(wheel_venv):
    """For a `build --backend torch` directory the wheel's fill-model-repo writes the Python-backend tensorrt_llm too,
    and its model.py resolves to the installed package (issue 22: real Triton runs it without TensorRT)."""
    root, venv = wheel_venv
    engines = root / "torch-engines"
    engines.mkdir()
    (engines / "bdlora_build.json").write_text(json.dumps({"format": "trtllm-bdlora/1", "backend": "torch", "tp": 2,
                                                           "dtype": "float16", "max_lora_rank": 32,
                                                           "ranks": ["rank0.safetensors", "rank1.safetensors"]}))
    repo = root / "torch-repo"
    done = subprocess.run([str(venv / "bin" / "trtllm-bdlora"), "fill-model-repo", "--engine-dir", str(engines),
                           "--tokenizer-dir", "/models/y", "--output", str(repo)],
                          capture_output=True, text=True, cwd=root, env=clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert missing_files(repo) == []
    assert (repo / "tensorrt_llm" / "1" / "model.py").read_text() == python_model_source("tensorrt_llm")
    assert 'backend: "python"' in (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    loaded = subprocess.run([str(venv / "bin" / "python"), "-c", LOAD_MODELS, str(repo), "tensorrt_llm"],
                            capture_output=True, text=True, cwd=root, env=clean_env(), timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    path = json.loads(loaded.stdout)["tensorrt_llm"]
    assert path.startswith(str(venv / "lib")) and path.endswith("trtllm_bdlora/trtllm/python_models/tensorrt_llm.py")

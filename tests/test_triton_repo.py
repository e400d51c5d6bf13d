"""model_repo/: every config.pbtxt parses with tritonclient's ModelConfig protobuf once filled, the ensemble's
wiring is consistent, and the launcher / container entrypoint plan the right commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tests.helpers import REPO, run_cli
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.serving.repository.spec import ENSEMBLE
from trtllm_bdlora.trtllm.triton_repo import fill_model_repo, launch_command


@pytest.fixture
def filled(tmp_path):
    return fill_model_repo(tmp_path / "repo", {"engine_dir": "/engines/x", "tokenizer_dir": "/models/y", "tp_size": "2"})


def load(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_every_config_parses(filled):
    configs = sorted(filled.rglob("config.pbtxt"))
    assert {c.parent.name for c in configs} == {"preprocessing", "tensorrt_llm", "postprocessing", "ensemble",
                                                "tensorrt_llm_bls"}
    assert all((c.parent / "1").is_dir() for c in configs)  # Triton needs a version directory for every model
    assert (filled / "preprocessing" / "1" / "model.py").is_file() and (filled / "tensorrt_llm_bls" / "1" / "model.py").is_file()
    for path in configs:
        config = load(path)
        assert config.name == path.parent.name and config.max_batch_size == 64
    trt = load(filled / "tensorrt_llm" / "config.pbtxt")
    assert trt.backend == "tensorrtllm" and trt.model_transaction_policy.decoupled
    assert trt.parameters["gpt_model_path"].string_value == "/engines/x"
    assert trt.parameters["lora_cache_max_adapter_size"].string_value == "64"


def test_ensemble_wiring(filled):
    models = {p.parent.name: load(p) for p in filled.rglob("config.pbtxt")}
    ensemble = models["ensemble"]
    assert {i.name for i in ensemble.input} == {t.name for t in ENSEMBLE.inputs}  # the embedded server's contract
    produced = {i.name for i in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = models[step.model_name]
        names_in = {i.name for i in model.input}
        names_out = {o.name for o in model.output}
        assert set(step.input_map) <= names_in, step.model_name
        assert set(step.input_map.values()) <= produced, step.model_name
        assert set(step.output_map) <= names_out, step.model_name
        required = {i.name for i in model.input if not i.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        produced |= set(step.output_map.values())
    assert {o.name for o in ensemble.output} <= produced


def test_fill_errors(tmp_path):
    with pytest.raises(BdLoraError, match="--engine-dir is required"):
        fill_model_repo(tmp_path / "r", {"tokenizer_dir": "/t"})
    res = run_cli("fill-model-repo", "--engine-dir", "/e", "--tokenizer-dir", "/t", "--output", str(tmp_path / "o"),
                  "--set", "nonsense")
    assert res.returncode == 2 and "KEY=VALUE" in res.stderr


def test_launch_command_leader_mode():
    cmd = launch_command(8, "/repo", "/lib/p.so", as_root=True)
    assert cmd[:2] == ["mpirun", "--allow-run-as-root"]
    assert cmd.count("tritonserver") == 8 and cmd.count(":") == 7
    assert cmd.count("-x") == 8 and "LD_PRELOAD=/lib/p.so" in cmd
    assert cmd.count("--load-model=tensorrt_llm") == 7 and "--grpc-port=8001" in cmd


def test_launch_without_tritonserver_is_clear(tmp_path, filled):
    res = run_cli("launch-triton", "--world-size", "2", "--model-repo", str(tmp_path / "empty"))
    assert res.returncode == 2 and "not a filled model repository" in res.stderr
    res = run_cli("launch-triton", "--model-repo", str(filled))  # TensorRT engines: one server per rank
    assert res.returncode == 2 and "--world-size is required" in res.stderr
    res = run_cli("launch-triton", "--world-size", "2", "--model-repo", str(filled))
    assert res.returncode == 2 and "tritonserver not found" in res.stderr


def test_torch_build_gets_the_python_tensorrt_llm_model_and_one_server(tmp_path, tiny_llama):
    """fill-model-repo chooses the tensorrt_llm backend from the engine directory: a `build --backend torch` output
    gets our Python-backend model; launch-triton then starts one tritonserver (no mpirun, no plugin)."""
    engines = tmp_path / "engines"
    assert run_cli("build", "--model", str(tiny_llama), "--tp", "2", "--backend", "torch", "--output",
                   str(engines)).returncode == 0
    repo = fill_model_repo(tmp_path / "repo", {"engine_dir": str(engines), "tokenizer_dir": str(tiny_llama)})
    core = load(repo / "tensorrt_llm" / "config.pbtxt")
    assert core.backend == "python" and core.model_transaction_policy.decoupled
    assert core.parameters["gpt_model_path"].string_value == str(engines)
    assert "python_models.tensorrt_llm import TritonPythonModel" in (repo / "tensorrt_llm" / "1" / "model.py").read_text()
    assert load(repo / "preprocessing" / "config.pbtxt").parameters["tp_size"].string_value == "2"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # no tritonserver; this Python has no nvidia-pytriton
    res = subprocess.run([sys.executable, "-m", "trtllm_bdlora", "launch-triton", "--model-repo", str(repo)], env=env,
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "tritonserver not found" in res.stderr and "nvidia-pytriton" in res.stderr
    refill = fill_model_repo(repo, {"engine_dir": "/engines/trt", "tokenizer_dir": "/t", "tp_size": "2"})
    assert load(refill / "tensorrt_llm" / "config.pbtxt").backend == "tensorrtllm"
    assert not (refill / "tensorrt_llm" / "1" / "model.py").exists()  # the C++ backend: no stale Python model


def test_entrypoint_plans(tmp_path):
    env = dict(os.environ, MODEL="/models/m", TP="8", ENGINE_DIR=str(tmp_path / "engines"), DRY_RUN="1",
               PYTHONPATH=str(REPO), BACKEND="trtllm")  # as docker/Dockerfile sets it
    out = subprocess.run([str(REPO / "docker" / "entrypoint.sh")], env=env, capture_output=True, text=True, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 3 and lines[0].startswith("+ mpirun --allow-run-as-root -n 8 trtllm-bdlora build")
    assert "fill-model-repo" in lines[1] and "launch-triton --world-size 8" in lines[2]
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "config.json").write_text("{}")
    for r in range(8):
        (engines / f"rank{r}.engine").write_bytes(b"")
    out = subprocess.run([str(REPO / "docker" / "entrypoint.sh")], env=env, capture_output=True, text=True, check=True)
    assert not any("build" in line for line in out.stdout.splitlines() if line.startswith("+ "))  # engines kept
    env.pop("MODEL")
    bad = subprocess.run([sys.executable, "-m", "trtllm_bdlora.cli.entrypoint"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "set MODEL" in bad.stderr


def test_dockerfile_lint():
    text = (REPO / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    base = [line for line in lines if line.startswith("FROM ")]
    assert len(base) == 1 and ":" in base[0] and not base[0].endswith(":latest") and "trtllm" in base[0]
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
    assert any(line.startswith("ENTRYPOINT [") for line in lines)  # exec form
    assert "pip install --no-cache-dir" in text and "apt-get" not in text

"""`build` without TensorRT-LLM: defaults that work at every TP a model allows, adapter rank checks, the pinned
version check (with fake tensorrt / tensorrt_llm packages), the build GPU per rank, and the model-class hook that
swaps Lora modules for BD-LoRA ones (as trtllm-build --model_cls_file loads it, and as `build` uses it)."""

import subprocess
import sys
from importlib.machinery import SourceFileLoader

import pytest

from tests.helpers import REPO, make_tiny_llama
from tests.trtllm_fakes import FAKE_MODULES, write_fake_stack
from trtllm_bdlora.cli import main as cli_main
from trtllm_bdlora.trtllm.build import build_device
from trtllm_bdlora.versions import TENSORRT_LLM_VERSION, TENSORRT_VERSION


@pytest.fixture(scope="module")
def any_tp_llama(tmp_path_factory):
    """24 heads (MHA), intermediate 96: TP 1, 2, 3, 4 and 8 all shard it."""
    return make_tiny_llama(tmp_path_factory.mktemp("any_tp"), heads=24, kv_heads=24, hidden=48, layers=1, vocab=64)


def run(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_torch_build_defaults_work_at_every_tp(tp, any_tp_llama, tmp_path, capsys):
    code, out, err = run(capsys, "build", "--model", any_tp_llama, "--tp", tp, "--output", tmp_path / "b",
                         "--backend", "torch")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "b").glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]


def test_build_argument_checks(tiny_llama, lora_adapter, bd_adapters, tmp_path, capsys):
    code, _, err = run(capsys, "build", "--model", tiny_llama, "--tp", 8, "--output", tmp_path / "a", "--backend",
                       "torch", "--max-lora-rank", 4)
    assert code == 2 and "--max-lora-rank 4 is below --tp 8" in err
    code, _, err = run(capsys, "build", "--model", tiny_llama, "--tp", 2, "--output", tmp_path / "a", "--backend",
                       "torch", "--max-lora-rank", 512)
    assert code == 2 and "per-rank ranks up to 256, above the plugin's largest kernel tile 128" in err
    code, _, err = run(capsys, "build", "--model", tiny_llama, "--tp", 8, "--output", tmp_path / "a", "--backend",
                       "torch", "--adapter-dir", bd_adapters[0], "--adapter-dir", lora_adapter)
    assert code == 2 and err.count("\n") == 1 and (
        f"{lora_adapter}: layer 0 q_proj: rank 96 (plain LoRA rank 12 written as rank 8x12 for a BD-LoRA engine at "
        "tp 8) exceeds the engine's max_lora_rank 64 (build the engine with --max-lora-rank >= 96)") in err
    code, _, err = run(capsys, "build", "--model", tiny_llama, "--tp", 8, "--output", tmp_path / "a", "--backend",
                       "torch", "--adapter-dir", bd_adapters[0], "--adapter-dir", lora_adapter, "--max-lora-rank", 96)
    assert code == 0, err


def test_build_device_follows_the_mpi_local_rank():
    assert build_device({}, 8) == 0
    assert build_device({"OMPI_COMM_WORLD_LOCAL_RANK": "5"}, 8) == 5
    assert build_device({"OMPI_COMM_WORLD_LOCAL_RANK": "9"}, 8) == 1  # more ranks than GPUs on the node
    assert build_device({"SLURM_LOCALID": "3", "OMPI_COMM_WORLD_LOCAL_RANK": ""}, 4) == 3
    assert build_device({"MPI_LOCALRANKID": "2"}, 0) == 0


@pytest.fixture
def fake_stack(tmp_path, monkeypatch):
    def install(**versions):
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)
        monkeypatch.syspath_prepend(str(write_fake_stack(tmp_path / "site", **versions)))

    yield install
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


def test_build_and_entrypoint_refuse_other_versions(fake_stack, tiny_llama, tmp_path, capsys, monkeypatch):
    fake_stack(trtllm_version="1.0.0", trt_version="10.11.0.33")
    args = ("build", "--model", tiny_llama, "--tp", 2, "--output", tmp_path / "e")
    code, _, err = run(capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert f"tensorrt_llm 1.0.0 (need {TENSORRT_LLM_VERSION}); tensorrt 10.11.0.33 (need {TENSORRT_VERSION})" in err
    from trtllm_bdlora.cli import entrypoint

    monkeypatch.setenv("MODEL", str(tiny_llama))
    monkeypatch.setenv("BACKEND", "trtllm")  # as docker/Dockerfile sets it
    monkeypatch.delenv("DRY_RUN", raising=False)
    assert entrypoint.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("entrypoint: tensorrt_llm 1.0.0 (need") and err.count("\n") == 1
    monkeypatch.setenv("TRTLLM_BDLORA_ALLOW_VERSION_MISMATCH", "1")  # an explicit override goes on, warned
    code, out, err = run(capsys, *args, "--plugin-lib", tmp_path / "missing.so")
    assert code == 2 and "warning: tensorrt_llm 1.0.0" in out and "plugin library not found" in err


def test_build_passes_the_check_with_the_pinned_versions(fake_stack, tiny_llama, tmp_path, capsys):
    fake_stack()
    code, _, err = run(capsys, "build", "--model", tiny_llama, "--tp", 2, "--output", tmp_path / "e",
                       "--plugin-lib", tmp_path / "missing.so")
    assert code == 2 and "plugin library not found" in err and "need" not in err


def test_versions_are_read_without_importing(tmp_path, monkeypatch):
    """Issue 22 defect 11: the Docker build has no GPU, and importing TensorRT-LLM there fails; the version check
    reads the installed distributions' metadata instead (here packages whose import would raise)."""
    from trtllm_bdlora.versions import distribution_version, installed_versions

    root = write_fake_stack(tmp_path / "site", trtllm_version="1.2.1", trt_version="10.14.1.48")
    for package in ("tensorrt", "tensorrt_llm"):
        (root / package / "__init__.py").write_text("raise RuntimeError('libcuda.so.1: cannot open shared object file')\n")
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(root))
    assert installed_versions() == ("1.2.1", "10.14.1.48")
    assert "tensorrt_llm" not in sys.modules and "tensorrt" not in sys.modules
    assert distribution_version("tensorrt_llm_not_installed") is None


def test_model_class_hook_swaps_lora_modules(fake_stack, tmp_path, monkeypatch):
    fake_stack()
    lib = tmp_path / "libempty.so"  # stands in for the plugin library that model_cls.py loads
    (tmp_path / "empty.c").write_text("int bdlora_placeholder;\n")
    subprocess.run(["gcc", "-shared", "-fPIC", str(tmp_path / "empty.c"), "-o", str(lib)], check=True)
    monkeypatch.setenv("TRTLLM_BDLORA_PLUGIN_LIB", str(lib))
    from types import SimpleNamespace

    from trtllm_bdlora.trtllm.network import BD_A, BD_B, LORA_TARGET_MODULES, as_bdlora_model

    config = SimpleNamespace(mapping=SimpleNamespace(tp_size=4, tp_rank=3))
    # as trtllm-build --model_cls_file/--model_cls_name loads it (commands/build.py: SourceFileLoader, from_checkpoint)
    module = SourceFileLoader("models", str(REPO / "trtllm_bdlora" / "trtllm" / "model_cls.py")).load_module()
    via_trtllm_build = module.BdLoraLLaMAForCausalLM.from_checkpoint("ckpt", config=config)
    # as `trtllm-bdlora build` uses it: TensorRT-LLM's own from_hugging_face model, turned into the BD-LoRA class
    from tensorrt_llm.models import LLaMAForCausalLM

    via_build = as_bdlora_model(LLaMAForCausalLM(config))
    assert type(via_build) is type(via_trtllm_build)
    for model in (via_trtllm_build, via_build):
        assert all(name == "Lora" for name in (type(getattr(m, a)).__name__ for m in model.parts.values()
                                               for a in ("qkv_lora", "lora") if hasattr(m, a)))
        modules = list(LORA_TARGET_MODULES)
        assert model.prepare_inputs(max_batch_size=4, lora_target_modules=modules) == \
            {"max_batch_size": 4, "lora_target_modules": modules}
        assert set(model.seen_at_prepare.values()) == {"BdLoraModule"}  # swapped before the inputs are prepared
        attention, dense = model.parts["layers.0.attention"], model.parts["layers.0.attention.dense"]
        assert attention.qkv_lora.bd_factors == (BD_B,) * 3 and dense.lora.bd_factors == (BD_A,)
        assert model.parts["layers.0.mlp"].lora.bd_factors == (BD_B, BD_B)
        assert (attention.qkv_lora.tp_size, attention.qkv_lora.tp_rank) == (4, 3)
        assert attention.qkv_lora.out_hidden_sizes == [32, 16, 16] and dense.lora.in_hidden_size == 32

"""`trtllm-bdlora build` without TensorRT-LLM: argument checks, the missing-package message, torch shards."""

import json

import torch
from safetensors.torch import load_file

from tests.helpers import run_cli


def test_missing_tensorrt_llm_is_one_line(tiny_llama, tmp_path):
    res = run_cli("build", "--model", str(tiny_llama), "--tp", "2", "--output", str(tmp_path / "e"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorrt_llm" in lines[0] and "tritonserver" in lines[0] and "--backend torch" in lines[0]


def test_argument_validation(tiny_llama, tmp_path):
    res = run_cli("build", "--model", str(tiny_llama), "--tp", "2", "--output", str(tmp_path / "x"),
                  "--max-input-len", "64", "--max-seq-len", "32", "--backend", "torch")
    assert res.returncode == 2 and "must exceed" in res.stderr
    res = run_cli("build", "--model", str(tiny_llama), "--tp", "0", "--output", str(tmp_path))
    assert res.returncode == 2 and "must be >= 1" in res.stderr
    res = run_cli("build", "--model", str(tiny_llama), "--tp", "3", "--output", str(tmp_path / "y"), "--backend", "torch")
    assert res.returncode == 2 and "does not divide num_attention_heads" in res.stderr


def test_torch_backend_writes_rank_shards(tiny_llama, tmp_path):
    out = tmp_path / "torch_build"
    res = run_cli("build", "--model", str(tiny_llama), "--tp", "4", "--output", str(out), "--backend", "torch",
                  "--dtype", "float32")
    assert res.returncode == 0, res.stderr
    config = json.loads((out / "bdlora_build.json").read_text())
    assert config["backend"] == "torch" and config["tp"] == 4 and len(config["ranks"]) == 4
    full = load_file(str(tiny_llama / "model.safetensors"))
    shards = [load_file(str(out / f"rank{r}.safetensors")) for r in range(4)]
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([s[q] for s in shards]), full[q])
    assert torch.equal(torch.cat([s[o] for s in shards], dim=1), full[o])
    res = run_cli("build", "--model", str(tiny_llama), "--tp", "4", "--output", str(out), "--backend", "torch")
    assert res.returncode == 2 and "--overwrite" in res.stderr

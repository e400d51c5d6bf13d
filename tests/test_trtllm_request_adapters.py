"""Adapters on their way to a BD-LoRA engine: rank limits, engine-dir targets, bf16 storage, and requests in
TensorRT-LLM's plain form normalized so that the production path (runtime_model) still equals PEFT."""

import json
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from safetensors.torch import load_file  # noqa: E402

from tests.test_trtllm_runtime_model import MODULES, peft_modules, peft_reference, runtime_rank_sum  # noqa: E402
from trtllm_bdlora.adapters import load_peft_adapter  # noqa: E402
from trtllm_bdlora.adapters.trtllm_format import (  # noqa: E402
    convert_adapter,
    normalize_request_adapter,
    read_converted,
    weights_for_triton,
    write_converted,
)
from trtllm_bdlora.cli import main as cli_main  # noqa: E402
from trtllm_bdlora.errors import AdapterError  # noqa: E402
from trtllm_bdlora.llama.loader import load_model_config  # noqa: E402

UPSTREAM_IDS = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 5, "down_proj": 6, "up_proj": 7}


def upstream_plain_form(adapter_dir, np_dtype=np.float32):
    """What TensorRT-LLM's examples/hf_lora_convert.py sends for a plain PEFT LoRA, built here from the
    adapter's own files: one row per (layer, module), A (r x in) then B*alpha/r (out x r), zero-padded."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    rows, cfg = [], []
    for key in sorted(k for k in state if k.endswith("lora_A.weight")):
        parts = key.split(".")
        layer, module = int(parts[parts.index("layers") + 1]), parts[-3]
        a, b = state[key].double(), state[key.replace("lora_A", "lora_B")].double() * scale
        rows.append(torch.cat([a.flatten(), b.flatten()]))
        cfg.append([UPSTREAM_IDS[module], layer, a.shape[0]])
    weights = np.zeros((1, len(rows), max(r.numel() for r in rows)), np_dtype)
    for i, r in enumerate(rows):
        weights[0, i, : r.numel()] = r.numpy()
    return weights, np.array([cfg], np.int32)


def check_against_peft(converted, requests, peft, tp, tol, use_kernel=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    first = requests[0][0]
    for module in MODULES:
        base = peft[first][module].base_layer.weight.detach()
        x = torch.randn(sum(r[3] for r in requests), base.shape[1], generator=gen)
        want = peft_reference(peft, requests, module, x)
        got = runtime_rank_sum(converted, requests, module, base, x, tp, use_kernel)
        err = float((got - want).norm() / want.norm())
        assert err < tol, (module, tp, err)
    return err


@pytest.fixture(scope="module")
def peft_refs(tiny_llama, bd_adapters, lora_adapter):
    return {"bd": peft_modules(tiny_llama, bd_adapters[0]), "plain": peft_modules(tiny_llama, lora_adapter)}


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_upstream_plain_form_is_normalized_exactly(tp, tiny_llama, lora_adapter, peft_refs):
    shape = load_model_config(str(tiny_llama))
    weights, config = upstream_plain_form(lora_adapter)
    requests = [("plain", lora_adapter, 0, 3), ("plain2", lora_adapter, 1, 1)]
    peft = {"plain": peft_refs["plain"], "plain2": peft_refs["plain"]}
    normalized = normalize_request_adapter(weights, config, shape, tp, max_lora_rank=128)
    assert normalized[0].dtype == np.float32 and int(normalized[1][0, 0, 2]) == 12 * tp
    check_against_peft({"plain": normalized, "plain2": normalized}, requests, peft, tp, 1e-5)
    if tp in (2, 4):  # the defect: sent as is, each rank multiplies 12/tp of the rank and the result is wrong
        with pytest.raises(AssertionError):
            check_against_peft({"plain": (weights, config), "plain2": (weights, config)}, requests, peft, tp, 0.1)


def test_convert_adapter_form_passes_unchanged(tiny_llama, bd_adapters, lora_adapter):
    shape = load_model_config(str(tiny_llama))
    for directory in (bd_adapters[1], lora_adapter):
        for dtype in ("float16", "bfloat16"):
            weights, config = convert_adapter(load_peft_adapter(directory), tp=4, dtype=dtype)
            again = normalize_request_adapter(weights, config, shape, 4, max_lora_rank=64)
            assert again[0].dtype == weights.dtype and again[0].tobytes() == weights.tobytes()
            assert np.array_equal(again[1], config)


def test_normalize_refusals(tiny_llama, lora_adapter, bd_adapters):
    shape = load_model_config(str(tiny_llama))
    weights, config = upstream_plain_form(lora_adapter)
    with pytest.raises(AdapterError) as err:
        normalize_request_adapter(weights, config, shape, 8, max_lora_rank=64, path="task 7")
    assert str(err.value) == ("task 7: layer 0 q_proj: rank 96 (plain LoRA rank 12 written as rank 8x12 for a BD-LoRA "
                              "engine at tp 8) exceeds the engine's max_lora_rank 64 (build the engine with "
                              "--max-lora-rank >= 96)")
    dora = np.concatenate([config, np.zeros_like(config[..., :1])], axis=-1)
    dora[0, [i for i, c in enumerate(config[0]) if c[0] == 4 and c[1] == 0][0], 3] = 1  # layer 0 o_proj
    with pytest.raises(AdapterError, match="layer 0 o_proj as DoRA"):
        normalize_request_adapter(weights, dora, shape, 2, max_lora_rank=64)
    # a BD-LoRA adapter run through hf_lora_convert.py: a column module's stacked B (out x r/nb) gives the row
    # rank r/nb while A (r x in) fills r*in values, so values run past the row's factors
    bd = load_peft_adapter(bd_adapters[1]).modules[(0, "q_proj")]
    row = np.concatenate([bd.a.flatten().numpy(), bd.b.flatten().numpy()])[None, None, :]
    width = np.zeros((1, 2, 8 * 256), np.float32)  # as wide as its widest row (layer 1 q_proj at rank 8)
    width[0, 0, : row.shape[-1]] = row
    width[0, 1] = np.random.default_rng(0).standard_normal(8 * 256) * 0.05
    with pytest.raises(AdapterError, match="layer 0 q_proj: non-zero weights after its rank-1 A and B"):
        normalize_request_adapter(width, np.array([[[1, 0, 1], [1, 1, 8]]], np.int32), shape, 2, max_lora_rank=64)


def test_bf16_requests_in_both_encodings(tiny_llama, lora_adapter):
    import ml_dtypes

    shape = load_model_config(str(tiny_llama))
    weights, config = upstream_plain_form(lora_adapter)
    as_bf16 = weights.astype(ml_dtypes.bfloat16)
    via_ml = normalize_request_adapter(as_bf16, config, shape, 2, max_lora_rank=64)
    via_bits = normalize_request_adapter(as_bf16.view(np.dtype("V2")), config, shape, 2, max_lora_rank=64)
    assert via_ml[0].dtype == np.dtype("V2") and via_ml[0].tobytes() == via_bits[0].tobytes()
    from tritonclient.utils import np_to_triton_dtype

    assert np_to_triton_dtype(weights_for_triton(via_ml[0]).dtype) == "BF16"


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_bf16_round_trip_equals_peft(tp, bd_adapters, lora_adapter, peft_refs, tmp_path):
    requests = [("bd", bd_adapters[0], 0, 5), ("plain", lora_adapter, 1, 1)]
    converted = {}
    for name, directory, *_ in requests:
        write_converted(*convert_adapter(load_peft_adapter(directory), tp=tp, dtype="bfloat16"), tmp_path / name)
        converted[name] = read_converted(tmp_path / name)
        assert converted[name][0].dtype == np.dtype("V2")  # numpy has no bf16: raw bits, as upstream stores them
    check_against_peft(converted, requests, peft_refs, tp, 1e-2, seed=tp)
    if tp == 2:  # and through the kernel itself, in bf16
        check_against_peft(converted, requests, peft_refs, tp, 2e-2, use_kernel=True, seed=tp)


def run(capsys, *argv):
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_cli_rank_limit_and_engine_dir(lora_adapter, bd_adapters, tmp_path, capsys):
    code, _, err = run(capsys, "convert-adapter", str(lora_adapter), "--output", str(tmp_path / "o"), "--tp", "8",
                       "--max-lora-rank", "64")
    assert code == 2 and err == (
        f"trtllm-bdlora convert-adapter: error: {lora_adapter}: layer 0 q_proj: rank 96 (plain LoRA rank 12 written "
        "as rank 8x12 for a BD-LoRA engine at tp 8) exceeds the engine's max_lora_rank 64 (build the engine with "
        "--max-lora-rank >= 96)\n")
    code, _, err = run(capsys, "convert-adapter", str(bd_adapters[2]), "--output", str(tmp_path / "o"), "--tp", "8",
                       "--max-lora-rank", "16")
    assert code == 2 and "layer 0 q_proj: rank 32 exceeds the engine's max_lora_rank 16" in err
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({  # TensorRT-LLM's own engine config (EngineConfig.to_dict)
        "version": "1.2.1", "pretrained_config": {"dtype": "bfloat16", "mapping": {"tp_size": 4}},
        "build_config": {"lora_config": {"max_lora_rank": 32}, "plugin_config": {"lora_plugin": "bfloat16"}}}))
    code, out, _ = run(capsys, "convert-adapter", str(bd_adapters[0]), "--output", str(tmp_path / "ok"),
                       "--engine-dir", str(engine))
    assert code == 0 and "(bfloat16, tp 4, max rank 16)" in out
    weights, config = read_converted(tmp_path / "ok")
    assert weights.dtype == np.dtype("V2") and int(config[0, :, 2].max()) == 16
    code, _, err = run(capsys, "convert-adapter", str(lora_adapter), "--output", str(tmp_path / "o2"),
                       "--engine-dir", str(engine))
    assert code == 2 and "rank 48 (plain LoRA rank 12 written as rank 4x12" in err and "max_lora_rank 32" in err
    code, _, err = run(capsys, "convert-adapter", str(bd_adapters[0]), "--output", str(tmp_path / "o3"),
                       "--engine-dir", str(engine), "--tp", "2")
    assert code == 2 and "--tp 2 contradicts" in err and "config.json (4)" in err
    (engine / "bdlora_build.json").write_text(json.dumps({"tp": 2, "max_lora_rank": 64, "dtype": "float16"}))
    code, out, _ = run(capsys, "convert-adapter", str(lora_adapter), "--output", str(tmp_path / "o4"),
                       "--engine-dir", str(engine))
    assert code == 0 and "(float16, tp 2, max rank 24)" in out
    code, _, err = run(capsys, "convert-adapter", str(lora_adapter), "--output", str(tmp_path / "o5"),
                       "--engine-dir", str(tmp_path))
    assert code == 2 and "not an engine directory" in err

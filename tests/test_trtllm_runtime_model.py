"""Executable model of the production path: converted adapter -> TensorRT-LLM's per-rank split ->
BD-LoRA plugin math (kernel and torch) + base TP sharding; the rank sum equals PEFT's module output."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tests.trtllm_reference import (  # noqa: E402
    RankPages,
    plugin_reference,
    plugin_tables,
    split_like_copy_to_pages,
)
from trtllm_bdlora.adapters import load_peft_adapter  # noqa: E402
from trtllm_bdlora.adapters.trtllm_format import MODULE_IDS, convert_adapter, read_converted, write_converted  # noqa: E402
from trtllm_bdlora.kernels.multi_lora import launch  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_modules(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    layer = model.base_model.model.model.layers[1]
    return {n: getattr(layer.self_attn if n in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, n) for n in MODULES}


def rows_for(config, layer, name):
    idx = [i for i, c in enumerate(config[0]) if c[0] == MODULE_IDS[name] and c[1] == layer]
    assert len(idx) == 1
    return idx[0]


def runtime_rank_sum(converted, requests, module, base, x, tp, use_kernel, counter_check=True):
    """The production path for one module: each rank's copyToPages split of every request's row, the plugin's
    tables and math (kernel or torch), added to the rank's base GEMM; ranks combined as the engine does."""
    out_dim, in_dim = base.shape
    row = module in ("o_proj", "down_proj")
    lengths = [r[3] for r in requests]
    per_rank = []
    for rank in range(tp):
        pages = []
        for name, *_ in requests:
            w, c = converted[name]
            i = rows_for(c, 1, module)
            pages.append(split_like_copy_to_pages(w[0, i], c[0, i], in_dim, out_dim, tp, rank))
        tables = plugin_tables([r[2] for r in requests], lengths, [[p.rank for p in pages]],
                               [[(p.a.data_ptr(), p.b.data_ptr()) for p in pages]], tp, rank)
        x_local = x[:, rank * in_dim // tp : (rank + 1) * in_dim // tp] if row else x
        w_local = base[:, rank * in_dim // tp : (rank + 1) * in_dim // tp] if row else base.view(
            tp, out_dim // tp, in_dim)[rank]
        base_out = x_local.float() @ w_local.float().T
        m = pages[0].b.shape[0]
        if use_kernel:
            dtype = pages[0].a.dtype
            y = launch(base_out.to(dtype), x_local.to(dtype).contiguous(), tables.token_idx, tables.seg_start,
                       tables.seg_len, tables.ptr_table, tables.meta_table, tables.scale_table, [0], [m],
                       tables.max_rank).float()
        else:
            counter = {}
            f32_pages = [RankPages(p.a.float(), p.b.float(), p.rank) for p in pages]
            y = base_out + plugin_reference(x_local.float(), tables, [f32_pages], [m], counter)[0]
            if counter_check:  # the plugin multiplies exactly r/tp rows of A and r/tp columns of B of each page
                assert counter == {"a": sum(p.a.numel() // tp for p in pages), "b": sum(p.b.numel() // tp for p in pages)}
        per_rank.append(y)
    return sum(per_rank) if row else torch.cat(per_rank, dim=1)


def peft_reference(peft, requests, module, x):
    lengths = [r[3] for r in requests]
    starts = np.cumsum([0] + lengths[:-1])
    return torch.cat([peft[name][module](x[s : s + n]).detach() for (name, *_), s, n in zip(requests, starts, lengths)])


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_rank_sum_equals_peft(tp, tiny_llama, bd_adapters, lora_adapter, tmp_path):
    requests = [("bd", bd_adapters[0], 0, 5), ("plain", lora_adapter, 1, 1)]  # (name, dir, request type, ctx len)
    converted, peft = {}, {}
    for name, directory, _, _ in requests:
        weights, config = convert_adapter(load_peft_adapter(directory), tp=tp, dtype="float32")
        write_converted(weights, config, tmp_path / name)
        converted[name] = read_converted(tmp_path / name)
        peft[name] = peft_modules(tiny_llama, directory)
    gen = torch.Generator().manual_seed(tp)
    for module in MODULES:
        base = peft["bd"][module].base_layer.weight.detach()
        x = torch.randn(sum(r[3] for r in requests), base.shape[1], generator=gen)
        want = peft_reference(peft, requests, module, x)
        for use_kernel in (True, False):
            got = runtime_rank_sum(converted, requests, module, base, x, tp, use_kernel)
            err = float((got - want).norm() / want.norm())
            assert err < 1e-5, (module, tp, use_kernel, err)


def test_converted_format(bd_adapters, tmp_path):
    adapter = load_peft_adapter(bd_adapters[0])
    weights, config = convert_adapter(adapter, tp=8)
    assert weights.dtype == np.float16 and weights.ndim == 3 and weights.shape[0] == 1
    assert config.dtype == np.int32 and config.shape == (1, 14, 3)
    assert {int(c[0]) for c in config[0]} == set(MODULE_IDS.values())
    f = adapter.modules[(0, "q_proj")]
    i = rows_for(config, 0, "q_proj")
    r, k, m = f.rank, f.in_features, f.out_features
    a = weights[0, i, : r * k].reshape(r, k)
    b = weights[0, i, r * k : r * k + m * r].reshape(m, r)
    np.testing.assert_allclose(a, f.dense_a().numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(b, (f.dense_b() * f.scaling).numpy(), rtol=1e-3, atol=1e-2)
    assert (b[: m // 8, r // 8 :] == 0).all()  # BD: zeros off the blocks


def test_convert_cli_errors(tmp_path):
    from tests.helpers import run_cli

    res = run_cli("convert-adapter", str(tmp_path), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "adapter_config.json" in res.stderr
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    res = run_cli("convert-adapter", str(tmp_path), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "refused" in res.stderr


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_adapter_from_trtllm_roundtrip(tp, bd_adapters, lora_adapter):
    """convert -> adapter_from_trtllm keeps every module's delta, and recovers BD blocks at the engine's TP."""
    from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm
    from trtllm_bdlora.llama.shape import LlamaShape

    shape = LlamaShape(128, 256, 2, 8, 8, 16)
    for directory, expect_bd in ((bd_adapters[0], tp > 1), (lora_adapter, False)):
        original = load_peft_adapter(directory)
        weights, config = convert_adapter(original, tp=1, dtype="float32")
        back = adapter_from_trtllm(weights, config, shape, tp=tp)
        assert back.kind == ("bdlora" if expect_bd else "lora")
        for key, f in original.modules.items():
            torch.testing.assert_close(back.modules[key].delta(), f.delta(), rtol=1e-5, atol=1e-5)


def test_adapter_from_trtllm_errors():
    from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm
    from trtllm_bdlora.errors import AdapterError
    from trtllm_bdlora.llama.shape import LlamaShape

    shape = LlamaShape(128, 256, 2, 8, 8, 16)
    good_w = np.zeros((1, 1, 4 * 256), np.float16)
    cases = [
        (good_w, np.array([[[1, 0, 4]]], np.float32), "integer"),
        (good_w, np.array([[[99, 0, 4]]], np.int32), "unknown module id 99"),
        (good_w, np.array([[[1, 5, 4]]], np.int32), "layer 5 outside"),
        (good_w, np.array([[[1, 0, 8]]], np.int32), r"needs lora_weights of float \[1, 2048\]"),
        (np.full((1, 1, 1024), np.nan, np.float16), np.array([[[1, 0, 4]]], np.int32), "NaN"),
        (good_w, np.array([[[1, 0, 4], [2, 0, 4]]], np.int32), r"float \[2, 1024\]"),
    ]
    for w, c, fragment in cases:
        with pytest.raises(AdapterError, match=fragment):
            adapter_from_trtllm(w, c, shape)

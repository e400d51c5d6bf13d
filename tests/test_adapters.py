"""Adapter loading against PEFT's own merged deltas, and every bad input's one-line error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import make_peft_adapter, rewrite_config
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.errors import AdapterError
from trtllm_bdlora.llama.shape import LlamaShape


def _peft_deltas(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            layer = int(name.split("layers.")[1].split(".")[0])
            variant = getattr(module, "lora_variant", {}).get("default")
            if variant is not None and hasattr(variant, "_get_bdlora_delta_weight"):
                delta = variant._get_bdlora_delta_weight(module, "default")
            else:
                delta = module.get_delta_weight("default")
            deltas[(layer, name.rsplit(".", 1)[1])] = delta.detach()
    return deltas


@pytest.mark.parametrize("kind", ["bdlora", "lora", "rslora"])
def test_dense_delta_equals_peft_merge(tiny_llama, tmp_path, kind):
    adapter_dir = make_peft_adapter(
        tiny_llama, tmp_path / kind, seed=5, r=16, nblocks=None if kind == "lora" else 8, rslora=kind == "rslora"
    )
    adapter = load_peft_adapter(adapter_dir)
    assert adapter.kind == ("lora" if kind == "lora" else "bdlora")
    peft = _peft_deltas(tiny_llama, adapter_dir)
    assert set(peft) == set(adapter.modules) and len(peft) == 14
    for key, f in adapter.modules.items():
        ours = f.delta()
        assert ours.abs().max() > 0
        torch.testing.assert_close(ours, peft[key], rtol=0, atol=1e-6)
        if kind != "lora":
            assert f.bd_factor == ("B" if f.role == "column" else "A")


def test_merge_matches_peft_merge_and_unload(tiny_llama, bd_adapters):
    """Independent of PEFT internals: W + delta equals PEFT's merge_and_unload() weights."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_llama).state_dict()
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), bd_adapters[0]).merge_and_unload()
    merged_sd = merged.state_dict()
    adapter = load_peft_adapter(bd_adapters[0])
    for (layer, name), f in adapter.modules.items():
        parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"model.layers.{layer}.{parent}.{name}.weight"
        torch.testing.assert_close(base[key] + f.delta(), merged_sd[key], rtol=0, atol=1e-6)


@pytest.fixture
def adapter_copy(bd_adapters, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bd_adapters[0], target)
    return target


def _expect(path, *fragments, shape=None):
    with pytest.raises(AdapterError) as info:
        load_peft_adapter(path, model_shape=shape)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _edit_weights(path, fn):
    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def test_missing_directory(tmp_path):
    _expect(tmp_path / "nope", "adapter directory not found")


def test_missing_config(adapter_copy):
    (adapter_copy / "adapter_config.json").unlink()
    _expect(adapter_copy, "adapter_config.json", "missing")


def test_missing_weights(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").unlink()
    _expect(adapter_copy, "adapter_model.safetensors", "missing")


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_refused(adapter_copy, name):
    (adapter_copy / "adapter_model.safetensors").unlink()
    (adapter_copy / name).write_bytes(b"\x80\x04this would be a pickle")
    _expect(adapter_copy, name, "refused", "never unpickled")


def test_corrupt_safetensors(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").write_bytes(b"garbage")
    _expect(adapter_copy, "unreadable safetensors")


def test_bad_json(adapter_copy):
    (adapter_copy / "adapter_config.json").write_text("{not json")
    _expect(adapter_copy, "invalid JSON")


def test_rank_mismatch(adapter_copy):
    _edit_weights(adapter_copy, lambda t: t.__setitem__(KEY_A, t[KEY_A][:8].contiguous()))
    _expect(adapter_copy, "q_proj", "rank mismatch")


def test_nblocks_not_dividing(adapter_copy):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    rewrite_config(adapter_copy, use_bdlora=dict(config["use_bdlora"], nblocks=3))
    _expect(adapter_copy, "nblocks=3 does not divide")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(adapter_copy, bad):
    def poison(t):
        t[KEY_B] = t[KEY_B].clone()
        t[KEY_B][0, 0] = bad

    _edit_weights(adapter_copy, poison)
    _expect(adapter_copy, "NaN or Inf", KEY_B)


@pytest.mark.parametrize("field, value, words", [
    ("rank_pattern", 5, ("rank_pattern must be a JSON object, got int",)),
    ("alpha_pattern", ["q_proj"], ("alpha_pattern must be a JSON object, got list",)),
    ("rank_pattern", {"(": 4}, ("rank_pattern key '('", "is not a regular expression")),
    ("use_bdlora.nblocks", "2", ("use_bdlora.nblocks must be an integer >= 1, got '2'",)),
    ("use_bdlora.nblocks", 2.5, ("use_bdlora.nblocks must be an integer >= 1, got 2.5",)),
    ("use_bdlora.nblocks", 0, ("use_bdlora.nblocks must be an integer >= 1, got 0",)),
    ("use_bdlora.target_modules_bd_a", "o_proj", ("use_bdlora.target_modules_bd_a must be a list of module names",)),
    ("use_bdlora.target_modules_bd_b", [1], ("use_bdlora.target_modules_bd_b must be a list of module names",)),
])
def test_malformed_config_fields_are_named(adapter_copy, field, value, words):
    """Fields of PEFT's types (LoraConfig, BdLoraConfig) with other JSON types: one line naming the field, never
    a Python error from deep inside the loader."""
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    parent, _, key = field.rpartition(".")
    (config[parent] if parent else config)[key] = value
    rewrite_config(adapter_copy, **{field.partition(".")[0]: config[field.partition(".")[0]]})
    _expect(adapter_copy, "adapter_config.json", *words)


def test_unknown_target_module_in_config(adapter_copy):
    rewrite_config(adapter_copy, target_modules=["q_proj", "lm_head"])
    _expect(adapter_copy, "unknown target modules", "lm_head")


def test_unknown_tensor(adapter_copy):
    _edit_weights(adapter_copy, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight", torch.ones(2, 2)))
    _expect(adapter_copy, "unknown target module", "rotary")


def test_missing_partner(adapter_copy):
    _edit_weights(adapter_copy, lambda t: t.pop(KEY_B))
    _expect(adapter_copy, "lora_B is missing")


def test_base_model_mismatch(adapter_copy):
    other = LlamaShape(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=32)
    _expect(adapter_copy, "base-model mismatch", shape=other)
    fewer_layers = LlamaShape(128, 256, 1, 8, 8, 16)
    _expect(adapter_copy, "layer 1", "base-model mismatch", shape=fewer_layers)


def test_dora_refused(adapter_copy):
    rewrite_config(adapter_copy, use_dora=True)
    _expect(adapter_copy, "use_dora")


def test_config_roundtrip_fields(bd_adapters):
    adapter = load_peft_adapter(bd_adapters[2])
    config = json.loads((bd_adapters[2] / "adapter_config.json").read_text())
    assert adapter.rank == config["r"] == 32 and adapter.nblocks == 8
    assert all(abs(f.scaling - 32 / 32) < 1e-12 for f in adapter.modules.values())

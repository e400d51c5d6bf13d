"""The Lora-module replacement plan: which factor is block-diagonal follows the layer type."""

import pytest

from trtllm_bdlora.trtllm.network import BD_A, BD_B, Replacement, plan_replacements


def mro(*names):
    return [*names, "Module", "object"]


def test_llama_layer_plan():
    owners = [
        ("transformer.layers.0.attention", mro("Attention"), "qkv_lora", 3),
        ("transformer.layers.0.attention.dense", mro("RowLinear", "Linear"), "lora", 1),
        ("transformer.layers.0.mlp", mro("GatedMLP", "MLP"), "lora", 2),
        ("transformer.layers.0.mlp", mro("FusedGatedMLP"), "fused_gate_up_lora", 1),
        ("transformer.layers.0.mlp.proj", mro("RowLinear", "Linear"), "lora", 1),
    ]
    plan = plan_replacements(owners)
    assert plan[0] == Replacement("transformer.layers.0.attention", "qkv_lora", (BD_B, BD_B, BD_B))
    assert plan[1].bd_factors == (BD_A,)  # o_proj: row-parallel, block-diagonal A
    assert plan[2].bd_factors == (BD_B, BD_B)
    assert plan[3].bd_factors == (BD_B,)
    assert plan[4].bd_factors == (BD_A,)  # down_proj


def test_unknown_owner_is_an_error():
    with pytest.raises(ValueError, match="no BD-LoRA rule"):
        plan_replacements([("x", mro("Embedding"), "lora", 1)])

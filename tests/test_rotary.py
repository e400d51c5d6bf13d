"""The engine's RoPE (engine/llama.py Rotary) against transformers' LlamaRotaryEmbedding, for each rope type a Llama
checkpoint may name, at random positions."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from trtllm_bdlora.engine.llama import Rotary

pytestmark = pytest.mark.unit

ROPE_SCALING = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("rope_type", list(ROPE_SCALING))
def test_rotary_matches_transformers(rope_type):
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=4096,
                         rope_theta=float(torch.randint(10_000, 500_000, ()).item()), rope_scaling=ROPE_SCALING[rope_type])
    assert config.rope_parameters["rope_type"] == rope_type
    positions = torch.randint(0, 8192 if rope_type == "dynamic" else 4096, (64,))
    cos, sin = Rotary(config, torch.device("cpu"))(positions)
    want_cos, want_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions.unsqueeze(0))
    assert cos.shape == (64, 64)
    torch.testing.assert_close(cos, want_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin[0], rtol=0, atol=1e-6)
    assert cos.abs().sum() > 0 and sin.abs().sum() > 0

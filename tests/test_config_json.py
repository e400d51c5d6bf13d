"""llama/config_json.py reads a config.json as transformers' LlamaConfig does, for every field the engine uses,
and the engine's RoPE from it equals transformers' LlamaRotaryEmbedding on transformers' own config."""

import json
import random

import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from trtllm_bdlora.engine.llama import Rotary
from trtllm_bdlora.llama.config_json import read_llama_config

pytestmark = pytest.mark.unit

FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
          "bos_token_id", "eos_token_id", "rope_parameters")

CONFIGS = {
    "defaults only": {"model_type": "llama"},
    "smollm2-like": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000, "vocab_size": 49152,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                     "eos_token_id": 2},
    "llama-3.1-like": {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
                       "rope_theta": 500000.0, "eos_token_id": [128001, 128008, 128009], "max_position_embeddings": 131072,
                       "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "legacy linear 'type'": {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "head_dim": 128,
                             "rope_scaling": {"type": "linear", "factor": 2.0}},
    "dynamic": {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 512,
                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fields_and_rope_as_transformers_reads_them(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    ours, theirs = read_llama_config(tmp_path), AutoConfig.from_pretrained(tmp_path)
    for field in FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), (name, field)
    positions = torch.tensor(random.sample(range(1024), 32))
    cos, sin = Rotary(ours, torch.device("cpu"))(positions)
    want_cos, want_sin = LlamaRotaryEmbedding(theirs)(torch.zeros(1), positions.unsqueeze(0))
    torch.testing.assert_close(cos, want_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin[0], rtol=0, atol=1e-6)


def test_not_a_llama_is_refused_in_one_line(tmp_path):
    from trtllm_bdlora.errors import ModelError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ModelError, match="model_type 'mistral' is not llama"):
        read_llama_config(tmp_path)

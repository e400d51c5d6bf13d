"""A Llama's config.json read as transformers' LlamaConfig reads it (its defaults, its rope parameters), without
importing transformers, which costs every rank seconds of CPU at start-up. `hf()` gives transformers' own config
where a library needs one (rope types beyond the default)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from trtllm_bdlora.errors import ModelError
from trtllm_bdlora.llama.shape import LlamaShape


def check_llama_config(where: object, model_type: object, attention_bias: object, mlp_bias: object) -> None:
    """Refuse what is not a Llama this package serves (transformers' config or the config.json alike)."""
    if model_type != "llama":
        raise ModelError(f"{where}: model_type {model_type!r} is not llama")
    if attention_bias or mlp_bias:
        raise ModelError(f"{where}: Llama models with biases are not supported")


# transformers' LlamaConfig defaults for the fields this package reads
LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
}
DEFAULT_ROPE_THETA = 10000.0


class LlamaConfigJson:
    """Attribute access to config.json with LlamaConfig's defaults; `head_dim`, `num_key_value_heads` and
    `rope_parameters` derived as transformers derives them."""

    def __init__(self, raw: dict, directory: Path):
        self._raw, self._directory = raw, directory

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._raw:
            return self._raw[name]
        if name in LLAMA_DEFAULTS:
            return LLAMA_DEFAULTS[name]
        raise AttributeError(f"{self._directory / 'config.json'} has no {name!r}")

    @property
    def head_dim(self) -> int:
        return self._raw.get("head_dim") or self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self._raw.get("num_key_value_heads") or self.num_attention_heads

    @property
    def rope_parameters(self) -> dict:
        """transformers' normalised form: `rope_parameters`, else the legacy `rope_scaling` (its `type` read as
        `rope_type`) with `rope_theta` beside it."""
        params = dict(self._raw.get("rope_parameters") or self._raw.get("rope_scaling") or {})
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", self._raw.get("rope_theta", DEFAULT_ROPE_THETA))
        return params

    def to_dict(self) -> dict:
        return dict(self._raw)

    def hf(self):
        """transformers' config of the same directory (imports transformers)."""
        return self._hf

    @cached_property
    def _hf(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self._directory)


def read_llama_config(directory: Path) -> LlamaConfigJson:
    """config.json of a model directory, refused in one line unless it is a Llama this package serves."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ModelError(f"{directory}: not a Hugging Face model directory (no config.json) and not 'smollm2-135m'")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: unreadable ({err})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: expected a JSON object")
    check_llama_config(directory, raw.get("model_type"), raw.get("attention_bias"), raw.get("mlp_bias"))
    return LlamaConfigJson(raw, Path(directory))


def read_config_shape(directory: Path) -> LlamaShape:
    """The shape from a model directory's config.json, with LlamaConfig's defaults, without loading transformers
    (the checks before any rank starts)."""
    return LlamaShape.from_config(read_llama_config(directory))

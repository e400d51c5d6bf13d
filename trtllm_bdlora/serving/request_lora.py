"""The check the production repository's `preprocessing` model runs on a request's `lora_weights` /
`lora_config` before they reach a BD-LoRA engine (issue 11 item 4): a plain LoRA (as TensorRT-LLM's
`hf_lora_convert.py` writes it) would be computed with 1/TP of its rank on each rank, so it is converted on
the way in to the BD-shaped form `convert-adapter --tp N` writes; BD forms pass unchanged; anything
malformed is refused with a one-line AdapterError.

STUB: the TRT-LLM-route engineer provides the real function in `trtllm_bdlora/adapters/trtllm_format.py`;
until it lands this composes the existing reader and writer. `check_request_lora` is the one name
`model_repo/preprocessing/1/model.py` imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trtllm_bdlora.errors import AdapterError
from trtllm_bdlora.models.shape import LlamaShape


def check_request_lora(weights: np.ndarray, config: np.ndarray, tp_size: int, shape: LlamaShape
                       ) -> tuple[np.ndarray, np.ndarray]:
    from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm, convert_adapter, fits_bd

    adapter = adapter_from_trtllm(weights, config, shape, tp_size, "lora_weights")
    if tp_size == 1 or all(fits_bd(f, tp_size) for f in adapter.modules.values()):
        return weights, config
    dtype = "float16" if np.asarray(weights).dtype == np.float16 else "float32"
    new_weights, new_config = convert_adapter(adapter, tp_size, dtype)
    if np.asarray(weights).ndim == 2:
        return new_weights[0], new_config[0]
    return new_weights, new_config


def shape_from_engine_config(engine_dir: str) -> LlamaShape:
    """The decoder dimensions an engine directory records: `trtllm-bdlora build`'s bdlora_build.json, else
    TensorRT-LLM's config.json (pretrained_config)."""
    record = Path(engine_dir) / "bdlora_build.json"
    if record.is_file():
        try:
            return LlamaShape(**json.loads(record.read_text())["shape"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AdapterError(f"{record}: cannot read the engine's dimensions ({type(err).__name__}: {err})") from None
    path = Path(engine_dir) / "config.json"
    try:
        pretrained = json.loads(path.read_text())["pretrained_config"]
        heads = pretrained["num_attention_heads"]
        return LlamaShape(hidden_size=pretrained["hidden_size"], intermediate_size=pretrained["intermediate_size"],
                          num_layers=pretrained["num_hidden_layers"], num_heads=heads,
                          num_kv_heads=pretrained.get("num_key_value_heads") or heads,
                          head_dim=pretrained.get("head_size") or pretrained["hidden_size"] // heads,
                          vocab_size=pretrained.get("vocab_size", 0))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AdapterError(f"{path}: cannot read the engine's dimensions ({type(err).__name__}: {err})") from None

"""What an engine directory says about the adapters it accepts: TP, max LoRA rank, weight dtype.

Read from `bdlora_build.json` (written by `trtllm-bdlora build`), else from TensorRT-LLM's own `config.json`
(`Engine.save` writes `EngineConfig.to_dict()`: `pretrained_config.{dtype, mapping.tp_size}` and
`build_config.lora_config.max_lora_rank`; tensorrt_llm/builder.py). The runtime requires `lora_weights` in the
model's dtype and rejects ranks above `max_lora_rank` (cpp/tensorrt_llm/runtime/loraUtils.cpp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trtllm_bdlora.errors import BdLoraError

BUILD_JSON = "bdlora_build.json"


@dataclass(frozen=True)
class EngineLoraInfo:
    tp: int
    max_lora_rank: int
    dtype: str
    source: str


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BdLoraError(f"{path}: cannot read ({err})") from None


def engine_lora_info(engine_dir: str | Path) -> EngineLoraInfo:
    d = Path(engine_dir)
    if (d / BUILD_JSON).is_file():
        config = _read_json(d / BUILD_JSON)
        try:
            return EngineLoraInfo(int(config["tp"]), int(config["max_lora_rank"]), str(config["dtype"]),
                                  str(d / BUILD_JSON))
        except (KeyError, TypeError, ValueError) as err:
            raise BdLoraError(f"{d / BUILD_JSON}: missing or bad {err}") from None
    if (d / "config.json").is_file():
        config = _read_json(d / "config.json")
        try:
            pretrained, build = config["pretrained_config"], config["build_config"]
            lora = build.get("lora_config") or {}
            return EngineLoraInfo(int(pretrained["mapping"]["tp_size"]), int(lora.get("max_lora_rank", 64)),
                                  str(pretrained["dtype"]), str(d / "config.json"))
        except (KeyError, TypeError, ValueError) as err:
            raise BdLoraError(f"{d / 'config.json'}: not a TensorRT-LLM engine config (missing {err})") from None
    raise BdLoraError(f"{d}: no {BUILD_JSON} or config.json (not an engine directory)")


def engine_max_seq_len(engine_dir: str | Path) -> int | None:
    """The longest sequence (prompt and output) the engine directory's engine takes, None where it cannot be read
    here: a torch build runs up to the model's max_position_embeddings (as `serve` does); TensorRT-LLM engines
    record build_config.max_seq_len in config.json."""
    d = Path(engine_dir)
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = (config.get("build_config") or {}).get("max_seq_len") if "pretrained_config" in config \
        else config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None

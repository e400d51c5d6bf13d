"""The placeholder values an engine directory decides (serving/repository/spec.py `${name}`s): `fill-model-repo` writes
the production repository with them and `serve` answers with them, so both describe the same repository."""

from __future__ import annotations

import json
from pathlib import Path

from trtllm_bdlora.errors import BdLoraError

BUILD_RECORD = "bdlora_build.json"  # written by `trtllm-bdlora build` beside the engines (or the torch shards)
ENGINE_DTYPES = {"float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32"}


def build_record(engine_dir: str) -> dict:
    path = Path(engine_dir) / BUILD_RECORD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BdLoraError(f"{path}: cannot read ({err})") from None


def engine_values(engine_dir: str) -> dict[str, str]:
    """What the engine directory says about the repository: its TP, the tensorrt_llm backend (ours, in Python, for a
    torch build), its LoRA rank limit and the dtype `lora_weights` must have."""
    record = build_record(engine_dir)
    values = {"tp_size": str(record["tp"])} if "tp" in record else {}
    if record.get("backend") == "torch":  # no TensorRT engines: our Python-backend tensorrt_llm runs the torch engine
        values["tensorrt_llm_backend"] = "python"
    if "max_lora_rank" in record:
        values["lora_cache_max_adapter_size"] = str(record["max_lora_rank"])
    if record.get("dtype") in ENGINE_DTYPES:
        values["lora_weights_data_type"] = ENGINE_DTYPES[record["dtype"]]
    return values

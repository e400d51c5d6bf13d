"""`lora_prefetch_dir`: adapters TensorRT-LLM's runtime puts into its LoRA cache when the `tensorrt_llm` model starts
(PeftCacheManager::prefetchLoraWeights: one directory per task id holding `model.lora_weights.npy` and
`model.lora_config.npy`; other names are skipped with a warning, a missing directory silently). Requests then
name the adapter by `lora_task_id` alone. These adapters never pass through `preprocessing`, so nothing converts
them on the way in: they must already be in the form a BD-LoRA engine computes exactly, as
`trtllm-bdlora convert-adapter --engine-dir` writes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.llama.shape import LlamaShape
from trtllm_bdlora.trtllm.engine_dir import EngineLoraInfo

FILES = ("model.lora_weights.npy", "model.lora_config.npy")
CONVERT_HINT = "write it with `trtllm-bdlora convert-adapter DIR --output OUT --engine-dir ENGINE`"


def task_dirs(prefetch_dir: Path) -> dict[int, Path]:
    """task id -> its directory; refuses (one line) what the runtime would skip or fail on."""
    tasks = {}
    for child in sorted(prefetch_dir.iterdir()):
        if not child.is_dir():
            continue
        if not child.name.isdigit():
            raise BdLoraError(f"{child}: not a task id (TensorRT-LLM prefetches only directories named by a number, "
                              f"the request's lora_task_id)")
        missing = [name for name in FILES if not (child / name).is_file()]
        if missing:
            raise BdLoraError(f"{child}: missing {' and '.join(missing)}")
        tasks[int(child.name)] = child
    return tasks


def rank_by_row(config: np.ndarray) -> dict[tuple[int, int], int]:
    """(module id, layer) -> rank, from a `lora_config` array of any leading shape."""
    rows = np.asarray(config).reshape(-1, np.asarray(config).shape[-1])
    return {(int(m), int(layer)): int(r) for m, layer, r, *_ in rows.tolist()}


def check_task(directory: Path, shape: LlamaShape, tp: int, max_lora_rank: int, dtype: str) -> None:
    """One prefetched adapter is in the engine's dtype, within its rank limit, and already BD-shaped for its TP."""
    from trtllm_bdlora.adapters.trtllm_format import MODULE_NAMES, normalize_request_adapter, read_converted, storage_dtype

    weights, config = read_converted(directory)
    found = storage_dtype(weights)
    if found != dtype:
        raise BdLoraError(f"{directory}: weights are {found}, the engine's dtype is {dtype} (the runtime refuses "
                          f"other dtypes); {CONVERT_HINT}")
    _, normalized = normalize_request_adapter(weights, config, shape, tp, max_lora_rank, dtype, str(directory))
    written, needed = rank_by_row(config), rank_by_row(normalized)
    for (module_id, layer), rank in sorted(written.items(), key=lambda item: (item[0][1], item[0][0])):
        if needed.get((module_id, layer), rank) != rank:
            raise BdLoraError(f"{directory}: layer {layer} {MODULE_NAMES[module_id]}: rank {rank} in the plain-LoRA form, "
                              f"of which the BD-LoRA engine at tp {tp} would compute 1/{tp} on each rank; {CONVERT_HINT}")


def check_prefetch_dir(prefetch_dir: Path, engine: tuple[LlamaShape, EngineLoraInfo] | None) -> list[int]:
    """The task ids of a local `lora_prefetch_dir`; with the engine's facts (the base model's dimensions, and its
    TP, `max_lora_rank` and dtype) every adapter is checked against them too."""
    tasks = task_dirs(prefetch_dir)
    if engine is not None:
        shape, info = engine
        for directory in tasks.values():
            check_task(directory, shape, info.tp, info.max_lora_rank, info.dtype)
    return sorted(tasks)

"""Where the embedded smollm2-135m is cached once dequantised (without importing torch: the checks before any rank
starts read its config.json from here)."""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED = "smollm2-135m"


def cache_dir() -> Path:
    root = os.environ.get("TRTLLM_BDLORA_CACHE") or Path.home() / ".cache" / "trtllm-bdlora"
    return Path(root)


def embedded_dir() -> Path:
    """The dequantised smollm2-135m's directory (it may not exist yet: loader.embedded_model_dir makes it)."""
    return cache_dir() / EMBEDDED


def embedded_ready() -> bool:
    target = embedded_dir()
    return (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()

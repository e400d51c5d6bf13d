"""Read a PEFT LoRA / BD-LoRA adapter directory into the canonical form, validating every tensor.

Only `.safetensors` is read: pickled checkpoints (`.bin`, `.pt`, `.pth`) are refused, never loaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from trtllm_bdlora.adapters.lora import Adapter, LoraFactors
from trtllm_bdlora.errors import AdapterError
from trtllm_bdlora.llama.shape import LLAMA_MODULES, MODULE_PARENT, LlamaShape, module_role

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module name's tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(directory: Path) -> dict:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing (not a PEFT adapter directory)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: invalid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "use_qalora"):
        if config.get(flag):
            raise AdapterError(f"{config_path}: {flag} adapters are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"{config_path}: modules_to_save {config['modules_to_save']} is not supported")
    r = config.get("r")
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{config_path}: r must be a positive integer, got {r!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(LLAMA_MODULES))
        if unknown:
            raise AdapterError(
                f"{config_path}: unknown target modules {unknown}; Llama modules are {list(LLAMA_MODULES)}"
            )
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(
                f"{directory / pickled[0]}: pickled checkpoints are refused (never unpickled); "
                f"re-save the adapter with save_pretrained(..., safe_serialization=True)"
            )
        raise AdapterError(f"{weights_path}: missing")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterError(f"{weights_path}: unreadable safetensors ({str(err).splitlines()[0]})") from None


def _bd_factor(bd_config: dict | None, module_path: str) -> str | None:
    if not bd_config:
        return None
    in_a = any(p in module_path for p in bd_config.get("target_modules_bd_a") or [])
    in_b = any(p in module_path for p in bd_config.get("target_modules_bd_b") or [])
    if in_a and in_b:
        raise AdapterError(f"{module_path}: matches both target_modules_bd_a and target_modules_bd_b")
    return "A" if in_a else "B" if in_b else None


def _check_factors(where: str, a: torch.Tensor, b: torch.Tensor, bd: str | None, nb: int, r_cfg: int) -> int:
    """Validate shapes of one A/B pair; returns the LoRA rank."""
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError(f"{where}: lora_A/lora_B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    r = a.shape[0]
    b_rank = b.shape[1] * (nb if bd == "B" else 1)
    if b_rank != r:
        raise AdapterError(
            f"{where}: rank mismatch, lora_A has rank {r} but lora_B {tuple(b.shape)} implies rank {b_rank}"
        )
    if r != r_cfg:
        raise AdapterError(f"{where}: rank {r} differs from the configured r={r_cfg}")
    if bd is not None:
        in_features = a.shape[1] * (nb if bd == "A" else 1)
        for label, dim in (("rank", r), ("in_features", in_features), ("out_features", b.shape[0])):
            if dim % nb:
                raise AdapterError(f"{where}: nblocks={nb} does not divide {label}={dim}")
    return r


def _check_against_model(where: str, name: str, layer: int, f: LoraFactors, shape: LlamaShape) -> None:
    if layer >= shape.num_layers:
        raise AdapterError(f"{where}: layer {layer} but the base model has {shape.num_layers} layers (base-model mismatch)")
    want_in, want_out = shape.module_dims(name)
    if (f.in_features, f.out_features) != (want_in, want_out):
        raise AdapterError(
            f"{where}: shape (in={f.in_features}, out={f.out_features}) does not match the base model's "
            f"{name} (in={want_in}, out={want_out}) (base-model mismatch)"
        )


def _scaling(config_path: Path, module_path: str, alpha, r: int, rslora: bool) -> float:
    """lora_alpha / r (or / sqrt(r)); a NaN, infinite or non-numeric alpha, or a scaling beyond float32, is refused."""
    try:
        value = float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else math.nan
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise AdapterError(f"{config_path}: lora_alpha for {module_path} must be a finite number, got {alpha!r}")
    scaling = value / math.sqrt(r) if rslora else value / r
    if not abs(scaling) <= torch.finfo(torch.float32).max:
        raise AdapterError(f"{config_path}: lora_alpha {alpha!r} gives scaling {scaling:g} for {module_path}, "
                           f"beyond float32")
    return scaling


def load_peft_adapter(
    path: str | Path, model_shape: LlamaShape | None = None, dtype: torch.dtype = torch.float32
) -> Adapter:
    """Load and validate a PEFT LoRA or BD-LoRA adapter directory; raises AdapterError on bad input."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory not found")
    config = _read_config(directory)
    tensors = _read_weights(directory)
    weights_path = directory / WEIGHTS_FILE

    bd_config = config.get("use_bdlora")
    if bd_config is not None and not isinstance(bd_config, dict):
        raise AdapterError(f"{directory / CONFIG_FILE}: use_bdlora must be an object")
    nblocks = int(bd_config.get("nblocks", 1)) if bd_config else 1
    if nblocks < 1:
        raise AdapterError(f"{directory / CONFIG_FILE}: nblocks must be >= 1, got {nblocks}")

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise AdapterError(f"{weights_path}: unsupported tensor {key!r} (only Llama q/k/v/o/gate/up/down LoRA)")
        layer, parent, name, factor = int(match[1]), match[2], match[3], match[4]
        if name not in LLAMA_MODULES:
            raise AdapterError(f"{weights_path}: unknown target module {name!r} in {key!r}")
        if not torch.is_floating_point(tensor):
            raise AdapterError(f"{weights_path}: {key} has non-float dtype {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights_path}: {key} contains NaN or Inf")
        pairs.setdefault((layer, name), {})[factor] = tensor
    if not pairs:
        raise AdapterError(f"{weights_path}: no LoRA tensors found")

    rslora = bool(config.get("use_rslora"))
    modules: dict[tuple[int, str], LoraFactors] = {}
    for (layer, name), ab in sorted(pairs.items()):
        parent = MODULE_PARENT[name]
        module_path = f"model.layers.{layer}.{parent}.{name}"
        where = f"{weights_path}: {module_path}"
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{where}: {missing} is missing")
        bd = _bd_factor(bd_config, module_path)
        if bd_config and bd is None and bd_config.get("match_strict", True):
            raise AdapterError(f"{where}: in neither BD-LoRA target list while match_strict is set")
        r_cfg = _pattern_value(config.get("rank_pattern"), module_path, config["r"])
        r = _check_factors(where, ab["A"], ab["B"], bd, nblocks, r_cfg)
        alpha = _pattern_value(config.get("alpha_pattern"), module_path, config.get("lora_alpha", 8))
        scaling = _scaling(directory / CONFIG_FILE, module_path, alpha, r, rslora)
        factors = LoraFactors(
            ab["A"].to(dtype), ab["B"].to(dtype), float(scaling), module_role(name), bd, nblocks if bd else 1
        )
        if model_shape is not None:
            _check_against_model(where, name, layer, factors, model_shape)
        modules[(layer, name)] = factors

    return Adapter(
        path=str(directory),
        kind="bdlora" if bd_config else "lora",
        rank=int(config["r"]),
        nblocks=nblocks,
        modules=modules,
        base_model=config.get("base_model_name_or_path"),
        stored_dtype=next(iter(tensors.values())).dtype,
    )

"""Read a PEFT LoRA / BD-LoRA adapter directory into the canonical form, validating every tensor.

Only `.safetensors` is read: pickled checkpoints (`.bin`, `.pt`, `.pth`) are refused, never loaded. The directory
and each file are opened once (adapters/files.py; under --adapter-root, checked to lie beneath it) and read from
those descriptors. Before any tensor is read, the safetensors header is checked (safetensors_file.py) against the
config's rank, the base model's module shapes, `max_lora_rank` and `max_elements` (what the host cache of every
rank can hold): nothing larger than a valid adapter can be is ever read.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from trtllm_bdlora.adapters.files import AdapterDir
from trtllm_bdlora.adapters.lora import Adapter, LoraFactors
from trtllm_bdlora.adapters.safetensors_file import FLOAT_DTYPES, TensorEntry, read_header, read_tensor
from trtllm_bdlora.errors import AdapterError
from trtllm_bdlora.llama.shape import LLAMA_MODULES, MODULE_PARENT, LlamaShape, module_role

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_CONFIG_BYTES = 1 << 20
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module name's tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(adir: AdapterDir) -> dict:
    config_path = Path(adir.display) / CONFIG_FILE
    text = adir.read_small(CONFIG_FILE, MAX_CONFIG_BYTES)
    if text is None:
        raise AdapterError(f"{config_path}: missing (not a PEFT adapter directory)")
    try:
        config = json.loads(text)
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
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is not None and not isinstance(patterns, dict):
            raise AdapterError(f"{config_path}: {key} must be a JSON object, got {type(patterns).__name__}")
        for pattern in patterns or {}:
            try:
                re.compile(pattern)
            except re.error as err:
                raise AdapterError(f"{config_path}: {key} key {pattern!r} is not a regular expression ({err})") from None
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(LLAMA_MODULES))
        if unknown:
            raise AdapterError(
                f"{config_path}: unknown target modules {unknown}; Llama modules are {list(LLAMA_MODULES)}"
            )
    return config


def _open_weights(adir: AdapterDir) -> int:
    fd = adir.open_file(WEIGHTS_FILE)
    if fd is None:
        pickled = sorted(n for n in adir.names() if Path(n).suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(
                f"{Path(adir.display) / pickled[0]}: pickled checkpoints are refused (never unpickled); "
                f"re-save the adapter with save_pretrained(..., safe_serialization=True)"
            )
        raise AdapterError(f"{Path(adir.display) / WEIGHTS_FILE}: missing")
    return fd


def _configured_ranks(config: dict) -> int:
    """The largest rank the config allows any module (r, or a rank_pattern value)."""
    ranks = [config["r"], *(v for v in (config.get("rank_pattern") or {}).values())]
    return max(r for r in ranks if isinstance(r, int) and not isinstance(r, bool))


def check_declared(what: str, entries: list[TensorEntry], configured_rank: int, max_lora_rank: int | None,
                   shape: LlamaShape | None, max_elements: int | None,
                   budget: str = "the host LoRA cache") -> dict[tuple[int, str, str], TensorEntry]:
    """The LoRA tensors a safetensors header declares, keyed by (layer, module, factor), each checked before it is
    read: a Llama LoRA name, once only, a float dtype, 2-D; then every lora_A's rank within `max_lora_rank`; then
    every rank dimension within `configured_rank` and the other within the base model's module (when `shape` is
    known); and all of them together within `max_elements` (what `budget` holds, for the message)."""
    declared: dict[tuple[int, str, str], TensorEntry] = {}
    for e in entries:
        match = _KEY.match(e.name)
        if not match:
            raise AdapterError(f"{what}: unsupported tensor {e.name!r} (only Llama q/k/v/o/gate/up/down LoRA)")
        layer, name, factor = int(match[1]), match[3], match[4]
        if name not in LLAMA_MODULES:
            raise AdapterError(f"{what}: unknown target module {name!r} in {e.name!r}")
        if (layer, name, factor) in declared:
            raise AdapterError(f"{what}: layer {layer} {name} lora_{factor} is declared twice "
                               f"({declared[layer, name, factor].name!r} and {e.name!r})")
        if e.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{what}: {e.name} has non-float dtype {e.dtype}")
        if len(e.shape) != 2:
            raise AdapterError(f"{what}: {e.name}: lora_{factor} must be 2-D, got {list(e.shape)}")
        if shape is not None and layer >= shape.num_layers:
            raise AdapterError(f"{what}: {e.name}: layer {layer} but the base model has {shape.num_layers} layers "
                               "(base-model mismatch)")
        declared[layer, name, factor] = e
    if not declared:
        raise AdapterError(f"{what}: no LoRA tensors found")
    for (layer, name, factor), e in sorted(declared.items()):  # lora_A's first dimension is the module's rank
        if factor == "A" and max_lora_rank is not None and e.shape[0] > max_lora_rank:
            raise AdapterError(f"{what}: layer {layer} {name} has rank {e.shape[0]}, over --max-lora-rank "
                               f"{max_lora_rank}: refused before reading")
    rank_cap = configured_rank if max_lora_rank is None else min(configured_rank, max_lora_rank)
    total = 0
    for (layer, name, factor), e in sorted(declared.items()):
        rank_dim, other = (e.shape[0], e.shape[1]) if factor == "A" else (e.shape[1], e.shape[0])
        limit = None if shape is None else shape.module_dims(name)[0 if factor == "A" else 1]
        if rank_dim > rank_cap or (limit is not None and other > limit):
            dims = f"rank <= {rank_cap}" + (f", {'in' if factor == 'A' else 'out'} <= {limit}" if limit else "")
            raise AdapterError(f"{what}: {e.name} declares {e.dtype} {list(e.shape)} ({e.end - e.begin} bytes), "
                               f"larger than layer {layer} {name} lora_{factor} can be ({dims}): refused before reading")
        total += e.numel
        if max_elements is not None and total > max_elements:
            raise AdapterError(f"{what}: the tensors declare more than {max_elements} values, more than {budget} can "
                               "hold: refused before reading")
    return declared


def _read_weights(adir: AdapterDir, config: dict, shape: LlamaShape | None, max_lora_rank: int | None,
                  max_elements: int | None, budget: str) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(layer, module) -> {"A": tensor, "B": tensor}, every tensor checked from the header before it is read."""
    what = str(Path(adir.display) / WEIGHTS_FILE)
    fd = _open_weights(adir)
    try:
        declared = check_declared(what, read_header(fd, what), _configured_ranks(config), max_lora_rank, shape,
                                  max_elements, budget)
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for (layer, name, factor), entry in sorted(declared.items()):
            tensor = read_tensor(fd, entry, what)
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{what}: {entry.name} contains NaN or Inf")
            pairs.setdefault((layer, name), {})[factor] = tensor
        return pairs
    finally:
        os.close(fd)


def _bd_blocks(config_path: Path, bd_config) -> int:
    """The number of blocks of a `use_bdlora` setting (1 without one), its fields checked."""
    if bd_config is None:
        return 1
    if not isinstance(bd_config, dict):
        raise AdapterError(f"{config_path}: use_bdlora must be an object")
    nblocks = bd_config.get("nblocks", 1)
    if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks < 1:
        raise AdapterError(f"{config_path}: use_bdlora.nblocks must be an integer >= 1, got {nblocks!r}")
    for key in ("target_modules_bd_a", "target_modules_bd_b"):
        names = bd_config.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise AdapterError(f"{config_path}: use_bdlora.{key} must be a list of module names, got {names!r}")
    return nblocks


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


def load_peft_adapter(path: str | Path | AdapterDir, model_shape: LlamaShape | None = None,
                      dtype: torch.dtype = torch.float32, max_lora_rank: int | None = None,
                      max_elements: int | None = None, budget: str = "the host LoRA cache") -> Adapter:
    """Load and validate a PEFT LoRA or BD-LoRA adapter directory (a path, or an AdapterDir already opened, e.g.
    beneath --adapter-root); raises AdapterError on bad input. With `model_shape`, `max_lora_rank` and
    `max_elements` (what `budget` holds), a header declaring more than they allow is refused before any tensor
    is read."""
    if isinstance(path, AdapterDir):
        return _load(path, model_shape, dtype, max_lora_rank, max_elements, budget)
    with AdapterDir.open(path) as adir:
        return _load(adir, model_shape, dtype, max_lora_rank, max_elements, budget)


def _load(adir: AdapterDir, model_shape: LlamaShape | None, dtype: torch.dtype, max_lora_rank: int | None,
          max_elements: int | None, budget: str) -> Adapter:
    directory = Path(adir.display)
    config = _read_config(adir)
    weights_path = directory / WEIGHTS_FILE
    pairs = _read_weights(adir, config, model_shape, max_lora_rank, max_elements, budget)

    bd_config = config.get("use_bdlora")
    nblocks = _bd_blocks(directory / CONFIG_FILE, bd_config)

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
        stored_dtype=next(iter(next(iter(pairs.values())).values())).dtype,
    )

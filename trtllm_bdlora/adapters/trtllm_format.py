"""TensorRT-LLM's adapter request format (`lora_weights`, `lora_config`): written from, and read into, an Adapter.

Rows: one per (layer, module), `[module_id, layer, rank]`; weights rows hold A (rank x in) then B
(out x rank), flattened row-major, zero-padded to the widest row, with the scaling folded into B.
Block-diagonal factors are written densely (zeros off the blocks). After TensorRT-LLM's own per-rank
split (column: A whole, B out-slice; row: A in-slice, B whole) each rank's pages hold its BD blocks.

A plain LoRA (or a BD adapter whose blocks do not fit `tp`) is written, for `tp > 1`, in an
equivalent BD-shaped form of rank tp*r that the BD-LoRA plugin computes exactly:
column: A' = [A; ...; A], B' block-diagonal over output slices; row: A' block-diagonal over input
slices, B' = [B, ..., B]. Rank i then multiplies A and its own slice, as the replicated scheme would.

Weights are written in the engine's dtype. numpy has no bfloat16: bf16 weights are stored as raw 2-byte values
(dtype `V2`), exactly what TensorRT-LLM's `examples/hf_lora_convert.py --storage-type bfloat16` writes
(`tensorrt_llm._utils.torch_to_numpy` views bf16 as `np.dtype("V2")`); a Triton client sends them as BF16 by
viewing them as `ml_dtypes.bfloat16` (`weights_for_triton`), which tritonclient maps to "BF16".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trtllm_bdlora.adapters.lora import Adapter, LoraFactors, block_misfit
from trtllm_bdlora.errors import AdapterError

# TensorRT-LLM LORA_MODULE_IDS with its default HF mapping (lora_helper.get_default_trtllm_modules_to_hf_modules):
# mlp_h_to_4h is gate_proj and mlp_gate is up_proj.
MODULE_IDS = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 5, "down_proj": 6, "up_proj": 7}
MODULE_NAMES = {v: k for k, v in MODULE_IDS.items()}
TRTLLM_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
                "gate_proj": "mlp_h_to_4h", "down_proj": "mlp_4h_to_h", "up_proj": "mlp_gate"}
NP_DTYPES = {"float16": np.float16, "float32": np.float32}
WEIGHT_DTYPES = ("float16", "bfloat16", "float32")
BF16_STORAGE = np.dtype("V2")  # bf16 bit patterns, as TensorRT-LLM stores bf16 in numpy


def fits_bd(f: LoraFactors, tp: int) -> bool:
    return block_misfit(f, tp) is None


def bd_shaped_factors(f: LoraFactors, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (A, B) the BD plugin computes exactly at `tp`: the adapter's own when its blocks fit,
    else the rank-tp*r expansion of the module docstring."""
    a, b = f.dense_a(), f.dense_b()
    if tp == 1 or fits_bd(f, tp):
        return a, b
    if f.role == "column":
        out_slices = torch.tensor_split(b, tp, dim=0)
        return a.repeat(tp, 1), torch.block_diag(*out_slices)
    in_slices = torch.tensor_split(a, tp, dim=1)
    return torch.block_diag(*in_slices), b.repeat(1, tp)


def rank_limit_error(path: str, layer: int, name: str, f: LoraFactors, tp: int, max_lora_rank: int) -> str:
    written = written_rank(f, tp)
    kind = "plain LoRA" if f.bd_factor is None else f"BD-LoRA ({block_misfit(f, tp)})"
    why = f" ({kind} rank {f.rank} written as rank {tp}x{f.rank} for a BD-LoRA engine at tp {tp})" \
        if written != f.rank else ""
    return (f"{path}: layer {layer} {name}: rank {written}{why} exceeds the engine's max_lora_rank {max_lora_rank} "
            f"(build the engine with --max-lora-rank >= {written})")


def written_rank(f: LoraFactors, tp: int) -> int:
    """The rank a module is sent with to a BD-LoRA engine at `tp` (see bd_shaped_factors)."""
    return f.rank if tp == 1 or fits_bd(f, tp) else tp * f.rank


def check_rank_limit(adapter: Adapter, tp: int, max_lora_rank: int) -> None:
    """AdapterError naming the first module (by layer, module id) sent with a rank above `max_lora_rank`."""
    for (layer, name), f in sorted(adapter.modules.items(), key=lambda kv: (kv[0][0], MODULE_IDS[kv[0][1]])):
        if written_rank(f, tp) > max_lora_rank:
            raise AdapterError(rank_limit_error(adapter.path, layer, name, f, tp, max_lora_rank))


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor in the request format's numpy storage for `dtype` (bf16: raw bits as `V2`)."""
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(BF16_STORAGE)
    return values.numpy().astype(NP_DTYPES[dtype])


def storage_dtype(weights: np.ndarray) -> str:
    """float16 | bfloat16 | float32 of request weights (bf16 as `V2` bits or `ml_dtypes.bfloat16`)."""
    dtype = np.asarray(weights).dtype
    if dtype == BF16_STORAGE or dtype.name == "bfloat16":
        return "bfloat16"
    for name, np_dtype in NP_DTYPES.items():
        if dtype == np_dtype:
            return name
    raise AdapterError(f"lora_weights dtype {dtype} is not one of {', '.join(WEIGHT_DTYPES)}")


def weights_as_torch(weights: np.ndarray) -> torch.Tensor:
    """Request weights as a torch tensor of their own dtype (bf16 storage becomes torch.bfloat16)."""
    w = np.ascontiguousarray(weights)
    if storage_dtype(w) == "bfloat16":
        return torch.from_numpy(w.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(w)


def weights_for_triton(weights: np.ndarray) -> np.ndarray:
    """What a tritonclient request carries: bf16 storage viewed as `ml_dtypes.bfloat16` (sent as BF16)."""
    w = np.asarray(weights)
    if w.dtype == BF16_STORAGE:
        import ml_dtypes

        return w.view(ml_dtypes.bfloat16)
    return w


def convert_adapter(adapter: Adapter, tp: int = 1, dtype: str = "float16",
                    max_lora_rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(weights [1, rows, width], config [1, rows, 3] int32) as TensorRT-LLM's Triton client sends them.
    With `max_lora_rank`, a module whose written rank exceeds it is refused, naming the module and the rank."""
    if dtype not in WEIGHT_DTYPES:
        raise AdapterError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    if max_lora_rank is not None:
        check_rank_limit(adapter, tp, max_lora_rank)
    rows, configs = [], []
    for (layer, name), f in sorted(adapter.modules.items(), key=lambda kv: (kv[0][0], MODULE_IDS[kv[0][1]])):
        a, b = bd_shaped_factors(f, tp)
        b = b * f.scaling
        rows.append(torch.cat([a.reshape(-1), b.reshape(-1)]).double())
        configs.append([MODULE_IDS[name], layer, a.shape[0]])
    width = max(r.numel() for r in rows)
    dense = torch.zeros(1, len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        dense[0, i, : row.numel()] = row
    stored = dense.to(torch.bfloat16 if dtype == "bfloat16" else getattr(torch, dtype))
    if not torch.isfinite(stored).all():
        raise AdapterError(f"{adapter.path}: weights overflow {dtype} after folding in the scaling")
    return to_storage(stored, dtype), np.asarray([configs], dtype=np.int32)


def _bf16_as_float32(weights) -> np.ndarray:
    """bf16 request weights (`V2` bits or `ml_dtypes.bfloat16`) as float32; anything else unchanged."""
    w = np.asarray(weights)
    if w.dtype == BF16_STORAGE or w.dtype.name == "bfloat16":
        bits = np.ascontiguousarray(w).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return w


def normalize_request_adapter(weights, config, shape, tp: int, max_lora_rank: int, dtype: str | None = None,
                              path: str = "<request>") -> tuple[np.ndarray, np.ndarray]:
    """A request's `lora_weights` / `lora_config` in the form a BD-LoRA engine at `tp` computes exactly.

    BD-LoRA engines multiply r/tp of every adapter's rank on each rank, so a plain LoRA sent as TensorRT-LLM's
    tools write it (`hf_lora_convert.py`, rank r) would silently lose (tp-1)/tp of its rank. Here, modules whose
    factor is block-diagonal over `tp` blocks (column: B, row: A; what `convert-adapter` writes) are kept as
    they are; any other module is rewritten in the equivalent BD-shaped form of rank tp*r (module docstring).
    Returns (weights [1, rows, width] in `dtype` (default: the request's), config [1, rows, 3] int32); raises
    AdapterError with one line for DoRA rows, values past a row's factors, or a rank above `max_lora_rank`.
    `shape` is the base model's LlamaShape; `tp` and `max_lora_rank` are the engine's.
    """
    out_dtype = dtype or storage_dtype(weights)
    if out_dtype not in WEIGHT_DTYPES:
        raise AdapterError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {out_dtype!r}")
    w = _bf16_as_float32(weights)
    c = np.asarray(config)
    adapter = adapter_from_trtllm(w, c, shape, tp=tp, path=path)  # validates shapes, ids, layers, sizes
    rows = w.reshape(-1, w.shape[-1])
    for row, (module_id, layer, r, *dora) in zip(rows, c.reshape(-1, c.shape[-1]).tolist()):
        name = MODULE_NAMES[module_id]
        if dora and dora[0]:
            raise AdapterError(f"{path}: layer {layer} {name} is a DoRA row: BD-LoRA engines do not serve DoRA")
        used = r * sum(shape.module_dims(name))
        if np.any(row[used:]):
            raise AdapterError(f"{path}: layer {layer} {name}: non-zero weights after its rank-{r} A and B: not "
                               f"TensorRT-LLM's format (a BD-LoRA adapter must be converted with "
                               f"`trtllm-bdlora convert-adapter`, not hf_lora_convert.py)")
    return convert_adapter(adapter, tp, out_dtype, max_lora_rank)


def write_converted(weights: np.ndarray, config: np.ndarray, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    np.save(output / "model.lora_weights.npy", weights, allow_pickle=False)
    np.save(output / "model.lora_config.npy", config, allow_pickle=False)


def read_converted(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a converted adapter; never unpickles."""
    try:
        weights = np.load(directory / "model.lora_weights.npy", allow_pickle=False)
        config = np.load(directory / "model.lora_config.npy", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise AdapterError(f"{directory}: cannot read converted adapter ({err})") from None
    return weights, config


def _block_diagonal_stack(m: torch.Tensor, nblocks: int) -> torch.Tensor | None:
    """PEFT's stacked form of `m` if it is block-diagonal with `nblocks` blocks, else None."""
    rows, cols = m.shape
    if nblocks < 2 or rows % nblocks or cols % nblocks:
        return None
    r, c = rows // nblocks, cols // nblocks
    blocks = [m[i * r : (i + 1) * r, i * c : (i + 1) * c] for i in range(nblocks)]
    if not torch.equal(torch.block_diag(*blocks), m):
        return None
    return torch.cat(blocks)


def _check_request_sizes(w: np.ndarray, c: np.ndarray, shape, max_rank: int | None, path: str,
                         max_elements: int | None = None, tp: int = 1) -> list[tuple]:
    """Everything about `lora_config` and the size of `lora_weights`, checked before any value is read or copied:
    known modules and layers, no row twice, ranks in (0, max_rank], no more values than `max_elements` (what the
    host cache of every rank holds together) could ever hold, and `lora_weights` exactly [rows, width] with width
    the widest row's rank*(in+out) (rows are zero-padded to it, as TensorRT-LLM's converter writes them).
    Returns (name, layer, rank, in, out) per row.

    A request writes a block-diagonal factor out densely (zeros off the blocks): kept block-diagonal over `tp`
    ranks, a row of rank*(in+out) values takes at least rank*(in+out)/tp of them in the caches. Only more than that
    can never fit; what fits an empty cache but not the cache as it is, is the PEFT cache's refusal (retryable)."""
    if c.ndim != 2 or c.shape[1] not in (3, 4) or not np.issubdtype(c.dtype, np.integer):
        raise AdapterError(f"{path}: lora_config must be integer [rows, 3], got {c.dtype} {list(c.shape)}")
    if c.shape[0] == 0:
        raise AdapterError(f"{path}: lora_config has no rows")
    if c.shape[0] > shape.num_layers * len(MODULE_IDS):
        raise AdapterError(f"{path}: lora_config has {c.shape[0]} rows, more than the model's "
                           f"{shape.num_layers} layers x {len(MODULE_IDS)} modules")
    rows, seen = [], set()
    for module_id, layer, r, *dora in c.tolist():
        name = MODULE_NAMES.get(module_id)
        if name is None:
            raise AdapterError(f"{path}: lora_config has unknown module id {module_id} (known: {sorted(MODULE_NAMES)})")
        if not 0 <= layer < shape.num_layers:
            raise AdapterError(f"{path}: lora_config layer {layer} outside [0, {shape.num_layers})")
        if dora and dora[0]:
            raise AdapterError(f"{path}: lora_config marks layer {layer} {name} as DoRA, which is not supported")
        if r <= 0:
            raise AdapterError(f"{path}: lora_config rank {r} for layer {layer} {name} must be > 0")
        if max_rank is not None and r > max_rank:
            raise AdapterError(f"{path}: lora_config rank {r} for layer {layer} {name} exceeds --max-lora-rank {max_rank}")
        if (layer, name) in seen:
            raise AdapterError(f"{path}: lora_config lists layer {layer} {name} twice")
        seen.add((layer, name))
        rows.append((name, layer, r, *shape.module_dims(name)))
    values = sum(r * (i + o) for _, _, r, i, o in rows)
    if max_elements is not None and values > max_elements * tp:
        kept = f" (at least 1/{tp} of them kept, block-diagonal over {tp} ranks)" if tp > 1 else ""
        raise AdapterError(f"{path}: lora_config describes {values} values{kept}, more than the whole host LoRA cache "
                           f"of every rank holds ({max_elements}; --lora-cache-host-bytes)")
    width = max(r * (i + o) for _, _, r, i, o in rows)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating) or tuple(w.shape) != (len(rows), width):
        raise AdapterError(f"{path}: lora_config needs lora_weights of float [{len(rows)}, {width}] (rank*(in+out) of "
                           f"its widest row), got {w.dtype} {list(w.shape)}")
    return rows


def check_request_adapter(weights, config, shape, max_rank: int | None = None, max_elements: int | None = None,
                          path: str = "<request>", tp: int = 1) -> None:
    """The sizes and limits of a request's `lora_weights` / `lora_config`, before any value is read (hashed,
    converted or copied): AdapterError in one line."""
    w = np.asarray(weights)
    if w.dtype == BF16_STORAGE or w.dtype.name == "bfloat16":
        w = w.view(np.float16)  # 2-byte values all the same: only the sizes are checked here
    w, c = _unbatched(w, np.asarray(config))
    _check_request_sizes(w, c, shape, max_rank, path, max_elements, tp)


def _unbatched(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (w[0] if w.ndim == 3 and w.shape[0] == 1 else w), (c[0] if c.ndim == 3 and c.shape[0] == 1 else c)


def adapter_from_trtllm(weights, config, shape, tp: int = 1, path: str = "<request>", max_rank: int | None = None,
                        max_elements: int | None = None) -> Adapter:
    """A request's `lora_weights` / `lora_config` (TensorRT-LLM format) as an Adapter, validated (sizes and the
    rank cap before anything is copied). Scaling is already folded into B. Dense factors that are block-diagonal
    over `tp` blocks are kept as BD-LoRA (column: B, row: A), so the torch backend serves them communication-free."""
    from trtllm_bdlora.llama.shape import module_role

    w, c = _unbatched(np.asarray(weights), np.asarray(config))
    rows = _check_request_sizes(w, c, shape, max_rank, path, max_elements, tp)
    if not np.isfinite(w).all():
        raise AdapterError(f"{path}: lora_weights contain NaN or Inf")
    modules: dict = {}
    nblocks = tp
    for row, (name, layer, r, in_dim, out_dim) in zip(w, rows):
        flat = torch.from_numpy(np.ascontiguousarray(row[: r * (in_dim + out_dim)], dtype=np.float32))
        a = flat[: r * in_dim].view(r, in_dim).clone()
        b = flat[r * in_dim : r * (in_dim + out_dim)].view(out_dim, r).clone()
        role = module_role(name)
        stacked = _block_diagonal_stack(b if role == "column" else a, nblocks)
        if stacked is None:
            modules[(layer, name)] = LoraFactors(a, b, 1.0, role)
        elif role == "column":
            modules[(layer, name)] = LoraFactors(a, stacked, 1.0, role, "B", nblocks)
        else:
            modules[(layer, name)] = LoraFactors(stacked, b, 1.0, role, "A", nblocks)
    is_bd = all(f.bd_factor for f in modules.values())
    rank = max(f.rank for f in modules.values())
    return Adapter(path, "bdlora" if is_bd else "lora", rank, nblocks if is_bd else 1, modules)

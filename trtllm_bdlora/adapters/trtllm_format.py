"""TensorRT-LLM's adapter request format (`lora_weights`, `lora_config`): written from, and read into, an Adapter.

Rows: one per (layer, module), `[module_id, layer, rank]`; weights rows hold A (rank x in) then B
(out x rank), flattened row-major, zero-padded to the widest row, with the scaling folded into B.
Block-diagonal factors are written densely (zeros off the blocks). After TensorRT-LLM's own per-rank
split (column: A whole, B out-slice; row: A in-slice, B whole) each rank's pages hold its BD blocks.

A plain LoRA (or a BD adapter whose blocks do not fit `tp`) is written, for `tp > 1`, in an
equivalent BD-shaped form of rank tp*r that the BD-LoRA plugin computes exactly:
column: A' = [A; ...; A], B' block-diagonal over output slices; row: A' block-diagonal over input
slices, B' = [B, ..., B]. Rank i then multiplies A and its own slice, as the replicated scheme would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trtllm_bdlora.adapters.lora import Adapter, LoraFactors
from trtllm_bdlora.errors import AdapterError
from trtllm_bdlora.sharding.adapter import block_misfit

# TensorRT-LLM LORA_MODULE_IDS with its default HF mapping (lora_helper.get_default_trtllm_modules_to_hf_modules):
# mlp_h_to_4h is gate_proj and mlp_gate is up_proj.
MODULE_IDS = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 5, "down_proj": 6, "up_proj": 7}
MODULE_NAMES = {v: k for k, v in MODULE_IDS.items()}
TRTLLM_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
                "gate_proj": "mlp_h_to_4h", "down_proj": "mlp_4h_to_h", "up_proj": "mlp_gate"}
NP_DTYPES = {"float16": np.float16, "float32": np.float32}


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


def convert_adapter(adapter: Adapter, tp: int = 1, dtype: str = "float16") -> tuple[np.ndarray, np.ndarray]:
    """(weights [1, rows, width], config [1, rows, 3] int32) as TensorRT-LLM's Triton client sends them."""
    if dtype not in NP_DTYPES:
        raise AdapterError(f"dtype must be one of {', '.join(NP_DTYPES)}, got {dtype!r}")
    rows, configs = [], []
    for (layer, name), f in sorted(adapter.modules.items(), key=lambda kv: (kv[0][0], MODULE_IDS[kv[0][1]])):
        a, b = bd_shaped_factors(f, tp)
        b = b * f.scaling
        rows.append(torch.cat([a.reshape(-1), b.reshape(-1)]).double())
        configs.append([MODULE_IDS[name], layer, a.shape[0]])
    width = max(r.numel() for r in rows)
    weights = np.zeros((1, len(rows), width), dtype=NP_DTYPES[dtype])
    for i, row in enumerate(rows):
        weights[0, i, : row.numel()] = row.numpy()
    if not np.isfinite(weights).all():
        raise AdapterError(f"{adapter.path}: weights overflow {dtype} after folding in the scaling")
    return weights, np.asarray([configs], dtype=np.int32)


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


def _check_request_sizes(w: np.ndarray, c: np.ndarray, shape, max_rank: int | None, path: str) -> list[tuple]:
    """Everything about `lora_config` and the size of `lora_weights`, checked before any value is read or copied:
    known modules and layers, no row twice, ranks in (0, max_rank], and `lora_weights` exactly [rows, width] with
    width the widest row's rank*(in+out) (rows are zero-padded to it, as TensorRT-LLM's converter writes them).
    Returns (name, layer, rank, in, out) per row."""
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
    width = max(r * (i + o) for _, _, r, i, o in rows)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating) or tuple(w.shape) != (len(rows), width):
        raise AdapterError(f"{path}: lora_config needs lora_weights of float [{len(rows)}, {width}] (rank*(in+out) of "
                           f"its widest row), got {w.dtype} {list(w.shape)}")
    return rows


def adapter_from_trtllm(weights, config, shape, tp: int = 1, path: str = "<request>", max_rank: int | None = None) -> Adapter:
    """A request's `lora_weights` / `lora_config` (TensorRT-LLM format) as an Adapter, validated (sizes and the
    rank cap before anything is copied). Scaling is already folded into B. Dense factors that are block-diagonal
    over `tp` blocks are kept as BD-LoRA (column: B, row: A), so the torch backend serves them communication-free."""
    from trtllm_bdlora.models.shape import module_role

    w = np.asarray(weights)
    c = np.asarray(config)
    if w.ndim == 3 and w.shape[0] == 1:
        w = w[0]
    if c.ndim == 3 and c.shape[0] == 1:
        c = c[0]
    rows = _check_request_sizes(w, c, shape, max_rank, path)
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

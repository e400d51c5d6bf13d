"""Model and GPU-system presets for `trtllm-bdlora project`.

Model shapes are those of the published Hugging Face configs. GPU figures are datasheet leads; collective
constants are read off published nccl-tests results (sources beside each value). Every figure can be replaced by
measured ones: `--kernel-times gpu_suite.json` for compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trtllm_bdlora.llama.shape import LLAMA_MODULES, LlamaShape, module_role

MODELS = {
    # meta-llama/Llama-3.1-8B config.json: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads
    "llama-3.1-8b": LlamaShape(4096, 14336, 32, 32, 8, 128, 128256),
    # meta-llama/Llama-3.1-70B config.json: hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 KV heads
    "llama-3.1-70b": LlamaShape(8192, 28672, 80, 64, 8, 128, 128256),
}


@dataclass(frozen=True)
class Collective:
    """t(bytes) = latency + bytes * algorithm factor / bus bandwidth (nccl-tests' busbw convention: all_reduce
    moves 2(n-1)/n of the buffer per rank, all_gather (n-1)/n of the gathered output)."""

    latency_s: float
    busbw_bytes_per_s: float


@dataclass(frozen=True)
class System:
    """One node of `gpus` GPUs (or CPU ranks) with its roofline and collective constants."""

    name: str
    gpus: int
    mem_bw: float  # bytes/s per GPU
    flops: float  # dense 16-bit FLOP/s per GPU
    collectives: dict[str, Collective]
    sources: tuple[str, ...] = field(default=())


SYSTEMS = {
    "a100-80g-sxm": System(
        "8x A100-SXM4-80GB, NVLink 3 / NVSwitch (DGX A100)", 8, 2.039e12, 312e12,
        {"all_reduce": Collective(12e-6, 200e9), "all_gather": Collective(12e-6, 200e9)},
        (
            "A100 80GB SXM datasheet: 2,039 GB/s HBM2e, 312 TFLOP/s dense BF16",
            "busbw: nccl-tests all_reduce_perf on 8x A100-SXM4-80GB over NVLink, ~200 GB/s at large sizes "
            "(github.com/NVIDIA/nccl-tests/issues/149) and 208 GB/s (github.com/NVIDIA/nccl-tests/issues/178); "
            "all_gather given the same busbw (ring over the same links; no separate published figure read)",
            "latency 12 us: an estimate for 8-GPU ring/tree small-message collectives; the pages above give "
            "only large-message bandwidth (no small-size row was read), so this constant is NOT a published figure",
        ),
    ),
    "h100-sxm": System(
        "8x H100-SXM5-80GB, NVLink 4 / NVSwitch (DGX/HGX H100)", 8, 3.35e12, 989e12,
        {"all_reduce": Collective(8e-6, 480e9), "all_gather": Collective(8e-6, 370e9)},
        (
            "H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16",
            "busbw: NCCL maintainer on 8x H100: all_reduce with NVLink SHARP peaks at ~480 GB/s busbw, other "
            "collectives ~370 GB/s (github.com/NVIDIA/nccl-tests/issues/212)",
            "latency 8 us: nccl-tests on HGX 8x H100 with NVLSTree and CUDA graphs shows ~6 us at 2 GPUs, rising "
            "with the GPU count (github.com/NVIDIA/nccl/issues/1259); 8 us at 8 GPUs is an estimate from that",
        ),
    ),
}


def module_shapes(shape: LlamaShape, tp: int) -> dict[str, tuple[int, int, str]]:
    """Per-rank (K, M, role) of the seven modules under Megatron TP (KV heads replicated when fewer than tp)."""
    out = {}
    for name in LLAMA_MODULES:
        inp, outf = shape.module_dims(name)
        if name in ("k_proj", "v_proj"):
            outf = max(1, shape.num_kv_heads // tp) * shape.head_dim * tp
        role = module_role(name)
        out[name] = (inp, outf // tp, role) if role == "column" else (inp // tp, outf, role)
    return out


def resolve_model(name_or_path: str) -> LlamaShape:
    """A preset name or a Hugging Face config.json (or its directory)."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from trtllm_bdlora.errors import BdLoraError

    path = Path(name_or_path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise BdLoraError(f"--model {name_or_path!r}: not a preset ({', '.join(MODELS)}) nor a config.json")
    cfg = json.loads(path.read_text())
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    try:
        return LlamaShape.from_config(SimpleNamespace(**cfg))
    except AttributeError as err:
        raise BdLoraError(f"{path}: not a Llama config ({err})") from err

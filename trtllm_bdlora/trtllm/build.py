"""`trtllm-bdlora build`: one engine per TP rank with BD-LoRA plugins (trtllm), or per-rank shards (torch).

trtllm backend (inside NVIDIA's Triton TRT-LLM container, TensorRT-LLM 1.2.x): TensorRT-LLM's own Llama
conversion per rank (`LLaMAForCausalLM.from_hugging_face` with a TP `Mapping`), the LoRA plugin enabled,
our plugin library loaded, every `Lora` module swapped for a BD-LoRA one, one engine per rank; under
`mpirun -n N` each MPI rank builds its own engine in parallel. The output directory holds what
TensorRT-LLM's runtime and Triton's `tensorrt_llm` model read, plus `bdlora_build.json`.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
from pathlib import Path

from trtllm_bdlora.adapters.trtllm_format import TRTLLM_NAMES
from trtllm_bdlora.errors import BdLoraError

CONTAINER = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"  # TensorRT-LLM 1.2.x, TensorRT 10.13
LORA_TARGET_MODULES = list(TRTLLM_NAMES.values())
DEFAULT_PLUGIN_LIB = "plugins/build/libtrtllm_bdlora_plugin.so"


def validate_args(args: argparse.Namespace) -> None:
    if args.max_lora_rank < 1 or args.max_batch_size < 1 or args.max_input_len < 1:
        raise BdLoraError("--max-lora-rank, --max-batch-size and --max-input-len must be >= 1")
    if args.max_seq_len is not None and args.max_seq_len <= args.max_input_len:
        raise BdLoraError(f"--max-seq-len {args.max_seq_len} must exceed --max-input-len {args.max_input_len}")
    if args.max_lora_rank % args.tp:
        raise BdLoraError(f"--max-lora-rank {args.max_lora_rank} must be a multiple of --tp {args.tp}")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise BdLoraError(f"{out}: not empty (pass --overwrite to replace)")


def build_config_json(args: argparse.Namespace, shape, backend: str) -> dict:
    return {
        "format": "trtllm-bdlora/1",
        "backend": backend,
        "model": args.model,
        "tp": args.tp,
        "dtype": args.dtype,
        "max_lora_rank": args.max_lora_rank,
        "max_batch_size": args.max_batch_size,
        "max_input_len": args.max_input_len,
        "max_seq_len": args.max_seq_len,
        "lora_target_modules": LORA_TARGET_MODULES,
        "shape": shape.__dict__,
        "ranks": [f"rank{r}" + (".engine" if backend == "trtllm" else ".safetensors") for r in range(args.tp)],
    }


def build_torch(args: argparse.Namespace) -> Path:
    """Per-rank Megatron shards of the base model as safetensors, for the torch backend."""
    import torch
    from safetensors.torch import save_file

    from trtllm_bdlora.engine.engine import DTYPES
    from trtllm_bdlora.models.loader import load_base_model, resolve_model_dir
    from trtllm_bdlora.sharding import make_layout, shard_llama_state_dict

    base = load_base_model(args.model, DTYPES[args.dtype] if args.dtype in DTYPES else torch.float16)
    layout = make_layout(base.shape, args.tp)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(args.tp):
        shard = shard_llama_state_dict(base.state_dict, layout, rank)
        shard = {k: v.clone().contiguous() for k, v in shard.items()}  # untie shared embeddings
        save_file(shard, str(out / f"rank{rank}.safetensors"), metadata={"tp": str(args.tp), "rank": str(rank)})
        print(f"rank {rank}/{args.tp}: {len(shard)} tensors", flush=True)
    source = resolve_model_dir(args.model)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            (out / name).write_bytes((source / name).read_bytes())
    (out / "bdlora_build.json").write_text(json.dumps(build_config_json(args, base.shape, "torch"), indent=2))
    return out


def require_trtllm() -> None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise BdLoraError(
            f"--backend trtllm needs the 'tensorrt_llm' package (TensorRT-LLM 1.2.x), which is not installable here: "
            f"run this inside {CONTAINER} (see docker/ and docs/tensorrt-llm.md), or use --backend torch"
        )


def load_plugin_library(path: str) -> None:
    lib = Path(path)
    if not lib.is_file():
        raise BdLoraError(
            f"{lib}: plugin library not found (build it: cmake -S plugins -B plugins/build && cmake --build plugins/build)"
        )
    ctypes.CDLL(str(lib.resolve()), mode=ctypes.RTLD_GLOBAL)  # registers BdLora with TensorRT's registry


def build_trtllm_rank(args: argparse.Namespace, rank: int) -> None:  # pragma: no cover - needs TensorRT-LLM
    import tensorrt_llm
    from tensorrt_llm import BuildConfig
    from tensorrt_llm.lora_helper import LoraConfig
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import LLaMAForCausalLM, modeling_utils
    from tensorrt_llm.plugin import PluginConfig

    from trtllm_bdlora.models.loader import resolve_model_dir
    from trtllm_bdlora.trtllm.network import replace_lora_modules

    mapping = Mapping(world_size=args.tp, rank=rank, tp_size=args.tp)
    model = LLaMAForCausalLM.from_hugging_face(str(resolve_model_dir(args.model)), dtype=args.dtype, mapping=mapping)
    plugin_config = PluginConfig()
    plugin_config.lora_plugin = args.dtype
    plugin_config.remove_input_padding = True
    plugin_config.paged_kv_cache = True
    build_config = BuildConfig(
        max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
        max_seq_len=args.max_seq_len or args.max_input_len * 2, plugin_config=plugin_config,
        lora_config=LoraConfig(lora_target_modules=LORA_TARGET_MODULES, max_lora_rank=args.max_lora_rank),
    )
    original_add_lora = modeling_utils.add_lora

    def add_lora_then_bdlora(model, *a, **kw):  # runs inside tensorrt_llm.build after its own add_lora
        model = original_add_lora(model, *a, **kw)
        plan = replace_lora_modules(model, args.tp, rank)
        print(f"rank {rank}: {len(plan)} Lora modules -> BdLora", flush=True)
        return model

    modeling_utils.add_lora = add_lora_then_bdlora
    try:
        engine = tensorrt_llm.build(model, build_config)
    finally:
        modeling_utils.add_lora = original_add_lora
    engine.save(args.output)


def build_trtllm(args: argparse.Namespace) -> Path:  # pragma: no cover - needs TensorRT-LLM
    from trtllm_bdlora.engine.launch import mpi_world_size
    from trtllm_bdlora.models.loader import load_model_config

    load_plugin_library(args.plugin_lib)
    world = mpi_world_size() or 1
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for r in range(rank, args.tp, world):
        print(f"building rank {r}/{args.tp}", flush=True)
        build_trtllm_rank(args, r)
    if rank == 0:
        config = build_config_json(args, load_model_config(args.model), "trtllm")
        config["plugin_lib"] = str(Path(args.plugin_lib).resolve())
        (out / "bdlora_build.json").write_text(json.dumps(config, indent=2))
    return out


def main(args: argparse.Namespace) -> int:
    validate_args(args)
    if args.backend == "torch":
        out = build_torch(args)
    else:
        require_trtllm()
        out = build_trtllm(args)
    print(f"wrote {args.backend} build for tp {args.tp} to {out}")
    return 0

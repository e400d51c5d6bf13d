"""`trtllm-bdlora build`: one engine per TP rank with BD-LoRA plugins (trtllm), or per-rank shards (torch).

trtllm backend (inside the container pinned in `trtllm_bdlora.versions`): TensorRT-LLM's own Llama conversion per
rank (`LLaMAForCausalLM.from_hugging_face` with a TP `Mapping`), the LoRA plugin enabled, our plugin library
loaded, the model turned into its BD-LoRA class (network.bdlora_model_class: every `Lora` module becomes a
BD-LoRA one when the builder prepares the inputs), one engine per rank, each built on the rank's own GPU;
under `mpirun -n N` each MPI rank builds its share in parallel. The output directory holds what TensorRT-LLM's
runtime and Triton's `tensorrt_llm` model read, plus `bdlora_build.json`.

--max-lora-rank is the engine's limit on every request's adapter rank (the runtime rejects larger ones). A
BD-LoRA adapter is sent with its own rank r; a plain LoRA (or a BD adapter whose blocks do not fit the TP) is
sent in BD-shaped form of rank tp*r, so --max-lora-rank must be at least that: `--adapter-dir` checks it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from trtllm_bdlora.config import BuildConfig
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.trtllm.network import LORA_TARGET_MODULES, load_plugin_library
from trtllm_bdlora.versions import CONTAINER_IMAGE

MAX_KERNEL_RANK = 128  # the plugin's largest rank tile (plugins/CMakeLists.txt BDLORA_BLOCK_R)
LOCAL_RANK_ENV = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


def validate_config(args: BuildConfig) -> None:
    """What config.BuildConfig cannot check alone: the rank limit against the TP and the plugin, the output."""
    if args.max_lora_rank < args.tp:
        raise BdLoraError(f"--max-lora-rank {args.max_lora_rank} is below --tp {args.tp}: adapter ranks must be "
                          f"multiples of the TP, so no adapter would fit")
    if args.max_lora_rank // args.tp > MAX_KERNEL_RANK:
        raise BdLoraError(f"--max-lora-rank {args.max_lora_rank} at --tp {args.tp} gives per-rank ranks up to "
                          f"{args.max_lora_rank // args.tp}, above the plugin's largest kernel tile {MAX_KERNEL_RANK}")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise BdLoraError(f"{out}: not empty (pass --overwrite to replace)")


def check_adapters(adapter_dirs: list[str], tp: int, max_lora_rank: int) -> None:
    """Every adapter the engine will serve fits --max-lora-rank in the form it is sent at this TP."""
    from trtllm_bdlora.adapters import load_peft_adapter
    from trtllm_bdlora.adapters.trtllm_format import check_rank_limit

    for directory in adapter_dirs:
        check_rank_limit(load_peft_adapter(directory), tp, max_lora_rank)


def build_device(env: dict[str, str], device_count: int) -> int:
    """The GPU a build process uses, as trtllm-build's parallel_build picks it: the MPI local rank modulo the
    node's GPUs (every process on GPU 0 otherwise)."""
    local = next((int(env[k]) for k in LOCAL_RANK_ENV if env.get(k, "").isdigit()), 0)
    return local % device_count if device_count > 0 else 0


def build_config_json(args: BuildConfig, shape, backend: str) -> dict:
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
        "lora_target_modules": list(LORA_TARGET_MODULES),
        "shape": shape.__dict__,
        "ranks": [f"rank{r}" + (".engine" if backend == "trtllm" else ".safetensors") for r in range(args.tp)],
    }


def build_torch(args: BuildConfig) -> Path:
    """Per-rank Megatron shards of the base model as safetensors, for the torch backend."""
    import torch
    from safetensors.torch import save_file

    from trtllm_bdlora.engine.engine import DTYPES
    from trtllm_bdlora.llama.loader import load_base_model, resolve_model_dir
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
            f"--backend trtllm needs the 'tensorrt_llm' package, which is not installable here: "
            f"run this inside {CONTAINER_IMAGE} (see docker/ and docs/tensorrt-llm.md), or use --backend torch"
        )


def build_trtllm_rank(args: BuildConfig, rank: int) -> None:  # pragma: no cover - needs TensorRT-LLM
    import tensorrt_llm
    import torch
    from tensorrt_llm import BuildConfig
    from tensorrt_llm.lora_helper import LoraConfig
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import LLaMAForCausalLM
    from tensorrt_llm.plugin import PluginConfig

    from trtllm_bdlora.llama.loader import resolve_model_dir
    from trtllm_bdlora.trtllm.network import as_bdlora_model

    torch.cuda.set_device(build_device(dict(os.environ), torch.cuda.device_count()))
    mapping = Mapping(world_size=args.tp, rank=rank, tp_size=args.tp)
    model = LLaMAForCausalLM.from_hugging_face(str(resolve_model_dir(args.model)), dtype=args.dtype, mapping=mapping)
    plugin_config = PluginConfig()
    plugin_config.lora_plugin = args.dtype
    plugin_config.remove_input_padding = True
    plugin_config.paged_kv_cache = True
    build_config = BuildConfig(
        max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
        max_seq_len=args.max_seq_len or args.max_input_len * 2, plugin_config=plugin_config,
        lora_config=LoraConfig(lora_target_modules=list(LORA_TARGET_MODULES), max_lora_rank=args.max_lora_rank),
    )
    engine = tensorrt_llm.build(as_bdlora_model(model), build_config)
    engine.save(args.output)


def build_trtllm(args: BuildConfig) -> Path:  # pragma: no cover - needs TensorRT-LLM
    from trtllm_bdlora.distributed.launch import mpi_world_size
    from trtllm_bdlora.llama.loader import load_model_config

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


def main(args: BuildConfig) -> int:
    validate_config(args)
    check_adapters(args.adapter_dirs, args.tp, args.max_lora_rank)
    if args.backend == "torch":
        out = build_torch(args)
    else:
        from trtllm_bdlora.versions import require_pinned_stack

        require_trtllm()
        require_pinned_stack()
        out = build_trtllm(args)
    print(f"wrote {args.backend} build for tp {args.tp} to {out}")
    return 0

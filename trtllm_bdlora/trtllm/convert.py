"""`trtllm-bdlora convert-adapter`: a PEFT adapter written in TensorRT-LLM's request format
(see `trtllm_bdlora.adapters.trtllm_format`), checked against the engine it is for."""

from __future__ import annotations

from pathlib import Path

from trtllm_bdlora.adapters.trtllm_format import convert_adapter, fits_bd, write_converted
from trtllm_bdlora.config import ConvertConfig
from trtllm_bdlora.errors import BdLoraError


def engine_targets(tp: int | None, max_lora_rank: int | None, dtype: str | None,
                   engine_dir: str | None) -> tuple[int, int | None, str]:
    """(tp, max_lora_rank, dtype) from the flags and the engine directory; flags that contradict it are errors."""
    if engine_dir is None:
        return tp or 1, max_lora_rank, dtype or "float16"
    from trtllm_bdlora.trtllm.engine_dir import engine_lora_info

    info = engine_lora_info(engine_dir)
    for flag, given, engine in (("--tp", tp, info.tp), ("--max-lora-rank", max_lora_rank, info.max_lora_rank),
                                ("--dtype", dtype, info.dtype)):
        if given is not None and given != engine:
            raise BdLoraError(f"{flag} {given} contradicts {info.source} ({engine})")
    return info.tp, info.max_lora_rank, info.dtype


def convert_main(args: ConvertConfig) -> int:
    from trtllm_bdlora.adapters import load_peft_adapter

    tp, max_lora_rank, dtype = engine_targets(args.tp, args.max_lora_rank, args.dtype, args.engine_dir)
    shape = None
    if args.model:
        from trtllm_bdlora.llama.loader import load_model_config

        shape = load_model_config(args.model)
    adapter = load_peft_adapter(args.adapter_dir, model_shape=shape)
    weights, config = convert_adapter(adapter, tp, dtype, max_lora_rank)
    write_converted(weights, config, Path(args.output))
    expanded = {n for (_, n), f in adapter.modules.items() if tp > 1 and not fits_bd(f, tp)}
    note = f"; {len(expanded)} module kinds written in BD-shaped rank-{tp}x form" if expanded else ""
    print(f"wrote {config.shape[1]} rows x {weights.shape[2]} ({dtype}, tp {tp}, max rank "
          f"{int(config[0, :, 2].max())}) to {args.output}{note}")
    return 0

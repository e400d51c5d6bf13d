"""`trtllm-bdlora convert-adapter`: a PEFT adapter written in TensorRT-LLM's request format
(see `trtllm_bdlora.adapters.trtllm_format`)."""

from __future__ import annotations

from pathlib import Path

from trtllm_bdlora.adapters.trtllm_format import convert_adapter, fits_bd, write_converted


def main(args) -> int:
    from trtllm_bdlora.adapters import load_peft_adapter

    shape = None
    if args.model:
        from trtllm_bdlora.models.loader import load_model_config

        shape = load_model_config(args.model)
    adapter = load_peft_adapter(args.adapter_dir, model_shape=shape)
    weights, config = convert_adapter(adapter, args.tp, args.dtype)
    write_converted(weights, config, Path(args.output))
    expanded = [f"{n}" for (_, n), f in adapter.modules.items() if args.tp > 1 and not fits_bd(f, args.tp)]
    note = f"; {len(set(expanded))} module kinds written in BD-shaped rank-{args.tp}x form" if expanded else ""
    print(f"wrote {config.shape[1]} rows x {weights.shape[2]} ({args.dtype}) to {args.output}{note}")
    return 0


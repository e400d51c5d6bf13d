"""`inspect`: a PEFT adapter and its per-rank cost under each TP scheme."""

from __future__ import annotations

import json

from trtllm_bdlora.cli.flags import Flags, build, command
from trtllm_bdlora.cli.launching import Invocation
from trtllm_bdlora.config import InspectConfig


def add_commands(sub) -> None:
    p = command(sub, "inspect", help="describe a PEFT adapter and its per-rank cost under each TP scheme",
                description="Read a PEFT adapter (LoRA or BD-LoRA) and print its kind, rank, nblocks and modules (role, "
                            "block-diagonal factor); with --tp N, whether each scheme needs LoRA communication and "
                            "the parameters and bytes per rank. An invalid adapter exits 2 with one line.",
                configure=lambda ns: build(InspectConfig, ns, "inspect"), run=run_inspect)
    flags = Flags(p, InspectConfig, "inspect")
    flags.add("adapter_dir", help="the PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    flags.add("--tp", type=int, help="tensor-parallel ranks to report the per-rank cost for")
    flags.add("--model", help="check the adapter's shapes against this base model too (a Hugging Face Llama "
                              "directory or smollm2-135m)")
    flags.add("--json", action="store_true", help="print the report as JSON")


def run_inspect(config: InspectConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.adapters import load_peft_adapter
    from trtllm_bdlora.sharding.report import format_report, inspect_report

    shape = None
    if config.model:
        from trtllm_bdlora.llama.loader import load_model_config

        shape = load_model_config(config.model)
    adapter = load_peft_adapter(config.adapter_dir, model_shape=shape)
    report = inspect_report(adapter, config.tp, shape)
    print(json.dumps(report, indent=2) if config.json else format_report(report))
    return 0

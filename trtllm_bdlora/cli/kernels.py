"""`aot`: the BD-LoRA Triton kernel compiled ahead of time for the TensorRT plugin."""

from __future__ import annotations

from trtllm_bdlora.cli.flags import Flags, build, command
from trtllm_bdlora.cli.launching import Invocation
from trtllm_bdlora.config import AotConfig


def add_commands(sub) -> None:
    p = command(sub, "aot", help="compile the BD-LoRA Triton kernel ahead of time (PTX, cubin, C) for the plugin",
                description="Compile the BD-LoRA Triton kernel for every arch x dtype x rank tile into PTX, cubins and C "
                            "sources with a manifest, which the TensorRT plugin build links (plugins/README.md).",
                configure=lambda ns: build(AotConfig, ns, "aot"), run=run_aot)
    flags = Flags(p, AotConfig, "aot")
    flags.add("--output", metavar="DIR", help="where the kernels and manifest.json go")
    flags.add("--arch", help="comma-separated GPU architectures")
    flags.add("--dtype", help="comma-separated compute types (float16, bfloat16, float32)")
    flags.add("--block-r", help="comma-separated rank tile sizes to build (powers of two >= 16; the largest is the "
                                "largest per-rank rank)")
    flags.add("--require-pinned-triton", action="store_true",
              help="refuse a triton other than trtllm_bdlora.versions.TRITON_KERNEL_COMPILER (the plugin build)")


def run_aot(config: AotConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.kernels.aot import aot_main

    return aot_main(config)

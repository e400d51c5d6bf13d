"""Performance commands: `bench` (measured decode steps per scheme), `project` (projected on multi-GPU systems) and
`cpu-validate` (the projection's step model against `bench` on CPU ranks)."""

from __future__ import annotations

import argparse

from trtllm_bdlora.cli.flags import Flags, add_engine_flags, build, command
from trtllm_bdlora.cli.launching import Invocation, run_on_ranks
from trtllm_bdlora.config import DTYPES, BenchConfig, CpuValidateConfig, ProjectConfig, lora_kernel_from_env


def add_commands(sub) -> None:
    _add_bench(sub)
    _add_project(sub)
    _add_cpu_validate(sub)


def _add_bench(sub) -> None:
    p = command(sub, "bench", help="decode step time: no LoRA vs bdlora vs slora vs replicated",
                description="Time decode steps of one batch under every scheme (no LoRA, bdlora, slora, replicated), "
                            "the same random BD-LoRA adapters on one model, interleaved round-robin so that load from "
                            "other processes falls on every scheme alike; prints median, quartiles, min/max, tokens/s "
                            "and LoRA collectives per step. With --tp N > 1 it starts the N ranks itself.",
                configure=bench_config, run=run_bench)
    add_engine_flags(p, BenchConfig, "bench", aliases={"--threads-per-rank": ("--threads",)})  # bench's older name
    flags = Flags(p, BenchConfig, "bench", title="workload")
    flags.add("--batch", type=int, help="sequences per decode step")
    flags.add("--steps", type=int, help="timed decode steps per scheme (after one warm-up round)")
    flags.add("--prompt-len", type=int, help="prompt tokens prefilled per sequence before the timed steps")
    flags.add("--num-adapters", type=int, help="distinct random BD-LoRA adapters, assigned round-robin to the batch")
    flags.add("--rank", type=int, help="LoRA rank of the random BD adapters (rounded up to a multiple of --tp)")
    flags.add("--json", metavar="FILE", help="also write the results (median, quartiles, min/max) here")


def bench_config(ns: argparse.Namespace) -> BenchConfig:
    return build(BenchConfig, ns, "bench", lora_kernel=lora_kernel_from_env())


def run_bench(config: BenchConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.perf import bench

    return run_on_ranks(invocation, config.tp, config.comm_interface, lambda: bench.preflight(config),
                        lambda: bench.bench(config))


def _add_project(sub) -> None:
    from trtllm_bdlora.perf.presets import MODELS, SYSTEMS

    p = command(sub, "project", help="projected decode-step breakdown per scheme on an 8-GPU system (speed-up over slora)",
                description="Project one decode step's breakdown (base GEMMs, LoRA compute, collectives) per scheme on "
                            "a multi-GPU system from a roofline or measured kernel times, and the speed-up over slora:\n"
                            "  trtllm-bdlora project --model llama-3.1-70b --tp 8 --gpu a100-80g-sxm --batch 32 --rank 16 "
                            "--bd-rank 32\n"
                            "  trtllm-bdlora project --model path/to/config.json --tp 4 --gpu h100-sxm --batch 8 "
                            "--rank 64 --kernel-times gpu_suite.json\n"
                            "  trtllm-bdlora project --paper            # the paper's settings beside its reported "
                            "speed-ups",
                configure=lambda ns: build(ProjectConfig, ns, "project"), run=run_project)
    flags = Flags(p, ProjectConfig, "project")
    flags.add("--model", help=f"a preset ({', '.join(MODELS)}) or a Hugging Face config.json")
    flags.add("--tp", type=int, help="tensor-parallel GPUs")
    flags.add("--gpu", choices=list(SYSTEMS), help="the GPU system (datasheet and nccl-tests figures)")
    flags.add("--batch", type=int, help="sequences per decode step")
    flags.add("--rank", type=int, help="LoRA rank (slora, replicated)")
    flags.add("--bd-rank", type=int, help="BD-LoRA rank (default: --rank)")
    flags.add("--context", type=int, help="KV-cache length per sequence")
    flags.add("--adapters", type=int, help="distinct adapters per batch (default: min(batch, 8))")
    flags.add("--kernel-times", metavar="FILE", help="gpu_suite.json: measured kernel times instead of the roofline")
    flags.add("--paper", action="store_true", help="the paper's settings (TP 8, BD-LoRA at 2x rank) for 8B and 70B")
    flags.add("--json", metavar="FILE", help="also write the projection here")


def run_project(config: ProjectConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.perf.project import project_main

    return project_main(config)


def _add_cpu_validate(sub) -> None:
    p = command(sub, "cpu-validate", help="validate the step model against bench on CPU ranks over gloo",
                description="Give the step model of `project` CPU constants measured here (compute per category, a "
                            "gloo latency-bandwidth fit per collective) and compare its prediction with `bench` at "
                            "each --tp; writes predicted and measured per scheme to --out (docs/performance.md). "
                            "Run it alone on the machine.",
                configure=lambda ns: build(CpuValidateConfig, ns, "validate"), run=run_cpu_validate)
    flags = Flags(p, CpuValidateConfig, "validate")
    flags.add("--out", metavar="FILE", help="where the results go (JSON)")
    flags.add("--model", help="a Hugging Face Llama directory (default: a random 8-head Llama made here, so TP 2, 4 "
                              "and 8 divide it)")
    flags.add("--tp", type=int, nargs="+", help="the TPs to measure")
    flags.add("--batch", type=int, help="sequences per decode step")
    flags.add("--num-adapters", type=int, help="distinct random BD-LoRA adapters in the batch")
    flags.add("--rank", type=int, help="LoRA rank of the random adapters")
    flags.add("--steps", type=int, help="timed decode steps per scheme")
    flags.add("--prompt-len", type=int, help="prompt tokens per sequence")
    flags.add("--max-loras", type=int, help="adapter slots per rank")
    flags.add("--max-lora-rank", type=int, help="slot width (default: the engine's, 64)")
    flags.add("--dtype", choices=DTYPES, help="compute type")
    flags.add("--reps", type=int, help="gloo micro-benchmark repetitions per size")
    flags.add("--profile-only", action="store_true",
              help="write only the per-category compute of rank 0 at each --tp (no gloo, no bench) to --out")


def run_cpu_validate(config: CpuValidateConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.perf.cpu_validate import validate

    return validate(config)

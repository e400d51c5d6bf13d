"""`generate`: JSON-lines requests through the engine, one JSON line per request out."""

from __future__ import annotations

import argparse
import sys

from trtllm_bdlora.cli.flags import Flags, add_engine_flags, add_log_flags, build, command
from trtllm_bdlora.cli.launching import Invocation, run_on_ranks, stdin_as_file
from trtllm_bdlora.config import EngineConfig, GenerateConfig, LogConfig, lora_kernel_from_env


def add_commands(sub) -> None:
    p = command(sub, "generate", help="run JSON-lines requests through the engine",
                description="Read JSON-lines requests ({\"id\", \"adapter\": ID|null, \"prompt\" | \"prompt_ids\" | "
                            "\"messages\", \"max_tokens\", \"temperature\", \"top_p\", \"seed\"}) and write one JSON "
                            "line per request ({\"id\", \"adapter\", \"output_ids\", \"text\"} or {\"id\", \"error\"}), "
                            "in input order. With --tp N > 1 it starts the N ranks itself (or joins your mpirun -n N "
                            "launch).",
                configure=generate_config, run=run_generate)
    flags = Flags(p, GenerateConfig, "generate")
    flags.add("--requests", help="the JSON-lines file, or - for stdin")
    flags.add("--stats", action="store_true", help="add per-step collective accounting to each output line")
    add_engine_flags(p, exclude=frozenset({"allow_request_adapters"}))  # no request carries adapter weights here
    add_log_flags(p, GenerateConfig(requests="-").log)


def generate_config(ns: argparse.Namespace) -> GenerateConfig:
    return build(GenerateConfig, ns, "generate", engine=build(EngineConfig, ns, "engine", lora_kernel=lora_kernel_from_env()),
                 log=build(LogConfig, ns, "log", progress_bars=sys.stderr.isatty()))


def run_generate(config: GenerateConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.engine import generate

    def requests_from_file(argv: tuple[str, ...]):  # every rank reads the requests: they cannot share one stdin
        return stdin_as_file(argv, "--requests")

    return run_on_ranks(invocation, config.engine.tp, config.engine.comm_interface, lambda: generate.preflight(config),
                        lambda: generate.generate(config), rank_argv=requests_from_file if config.requests == "-" else None)

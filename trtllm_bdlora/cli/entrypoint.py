"""The one entrypoint of both images: docker/Dockerfile (TensorRT-LLM engines served by Triton on GPUs) and
docker/Dockerfile.cpu (`serve` with the torch backend on CPU). A user moves between them by changing the image name:

  IMAGE [serve] [FLAGS...]    serve; FLAGS are `trtllm-bdlora serve`'s (`IMAGE --help` lists them)
  IMAGE SUBCOMMAND ARGS...    any other trtllm-bdlora subcommand (generate, inspect, client, ...)
  IMAGE COMMAND ARGS...       any other command (bash, trtllm-bdlora-smoke)

The environment gives defaults for the serve flags; a flag on the command line wins. MODEL --model, TP --tp,
BACKEND --backend (each image sets its own), DTYPE, MAX_BATCH_SIZE, MAX_LORA_RANK, HOST, HTTP_PORT, GRPC_PORT,
METRICS_PORT, OPENAI_PORT as the flags of those names; ADAPTERS: ID=DIR entries separated by spaces or commas, one --adapter each;
API_KEY is read by `serve` itself (--api-key; refused by --backend trtllm, which Triton serves without keys).
--backend torch runs `trtllm-bdlora serve`. --backend trtllm checks the pinned TensorRT-LLM / TensorRT, builds the
per-rank engines if ENGINE_DIR (/engines) has none, fills MODEL_REPO (/model_repo) and launches one tritonserver per
rank with PLUGIN_LIB preloaded. DRY_RUN=1 prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

DEFAULT_PLUGIN = "/opt/trtllm-bdlora/lib/libtrtllm_bdlora_plugin.so"
ENV_FLAGS = (("MODEL", "--model"), ("TP", "--tp"), ("BACKEND", "--backend"), ("DTYPE", "--dtype"),
             ("MAX_BATCH_SIZE", "--max-batch-size"), ("MAX_LORA_RANK", "--max-lora-rank"), ("HOST", "--host"),
             ("HTTP_PORT", "--http-port"), ("GRPC_PORT", "--grpc-port"), ("METRICS_PORT", "--metrics-port"),
             ("OPENAI_PORT", "--openai-port"))
# serve flags the Triton route has no use for: refused there rather than silently dropped
TORCH_ONLY = {"scheme": "--scheme", "adapter": "--adapter", "max_loras": "--max-loras", "device": "--device",
              "lora_cache_host_bytes": "--lora-cache-host-bytes", "pin_adapters": "--no-pin-adapters",
              "comm_interface": "--comm-interface", "host": "--host", "max_queue": "--max-queue",
              "shutdown_timeout": "--shutdown-timeout", "max_streams": "--max-streams",
              "allow_request_adapters": "--no-allow-request-adapters", "openai_port": "--openai-port",
              "served_model_name": "--served-model-name", "allow_adapter_loading": "--allow-adapter-loading",
              "adapter_root": "--adapter-root", "max_num_tokens": "--max-num-tokens", "log_level": "--log-level",
              "max_connections": "--max-connections", "request_header_timeout": "--request-header-timeout",
              "request_body_timeout": "--request-body-timeout", "keep_alive_timeout": "--keep-alive-timeout",
              "max_keep_alive_requests": "--max-keep-alive-requests",
              "grpc_max_connection_idle": "--grpc-max-connection-idle",
              "grpc_max_connection_age": "--grpc-max-connection-age", "max_body_bytes": "--max-body-bytes",
              "api_key": "--api-key", "allowed_origins": "--allowed-origins",
              "threads_per_rank": "--threads-per-rank", "kv_cache_bytes": "--kv-cache-bytes"}


def serve_flags(env: dict[str, str], flags: list[str]) -> list[str]:
    """The environment's defaults, then the command line's flags (argparse keeps the last of a repeated flag)."""
    out: list[str] = []
    for name, flag in ENV_FLAGS:
        if env.get(name):
            out += [flag, env[name]]
    for entry in re.split(r"[\s,]+", env.get("ADAPTERS", "").strip()):
        if entry:
            out += ["--adapter", entry]
    return out + flags


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from trtllm_bdlora.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def trtllm_plan(args: argparse.Namespace, env: dict[str, str], engines_exist: bool) -> list[list[str]]:
    """build (if needed), fill-model-repo, launch-triton for `serve --backend trtllm` flags."""
    from trtllm_bdlora.llama.loader import EMBEDDED

    parser = _subcommands()["serve"]
    unused = [flag for dest, flag in TORCH_ONLY.items() if getattr(args, dest) != parser.get_default(dest)]
    if env.get("API_KEY"):  # never dropped silently: Triton itself has no API keys
        unused.append("API_KEY")
    if unused:
        raise SystemExit(f"entrypoint: {', '.join(unused)}: not used by --backend trtllm (Triton serves the engines; "
                         "adapters are registered by the first request that carries lora_weights and lora_config)")
    if args.model == EMBEDDED:
        raise SystemExit("entrypoint: set MODEL (or --model) to a Hugging Face Llama directory mounted into the container")
    tp, engine_dir, repo = str(args.tp), env.get("ENGINE_DIR", "/engines"), env.get("MODEL_REPO", "/model_repo")
    plugin = env.get("PLUGIN_LIB", DEFAULT_PLUGIN)
    max_lora_rank = str(args.max_lora_rank or 64)
    steps = []
    if not engines_exist:
        build = ["trtllm-bdlora", "build", "--model", args.model, "--tp", tp, "--output", engine_dir, "--plugin-lib",
                 plugin, "--max-lora-rank", max_lora_rank, "--max-batch-size", str(args.max_batch_size),
                 "--dtype", args.dtype, "--overwrite"]
        steps.append(["mpirun", "--allow-run-as-root", "-n", tp] + build if args.tp > 1 else build)
    steps.append(["trtllm-bdlora", "fill-model-repo", "--engine-dir", engine_dir, "--tokenizer-dir", args.model,
                  "--output", repo, "--max-batch-size", str(args.max_batch_size), "--max-lora-rank", max_lora_rank])
    steps.append(["trtllm-bdlora", "launch-triton", "--world-size", tp, "--model-repo", repo, "--plugin-lib", plugin,
                  "--grpc-port", str(args.grpc_port), "--http-port", str(args.http_port),
                  "--metrics-port", str(args.metrics_port)])
    return steps


def engines_exist(engine_dir: str, tp: int) -> bool:
    d = Path(engine_dir)
    return (d / "config.json").is_file() and all((d / f"rank{r}.engine").is_file() for r in range(tp))


def _pinned_stack_problem() -> str | None:
    from trtllm_bdlora.errors import BdLoraError
    from trtllm_bdlora.versions import require_pinned_stack

    try:
        require_pinned_stack()
    except BdLoraError as err:
        return str(err)
    return None


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    if argv and argv[0] != "serve" and not argv[0].startswith("-"):
        command = ["trtllm-bdlora", *argv] if argv[0] in _subcommands() else argv
        os.execvp(command[0], command)
    flags = serve_flags(env, argv[1:] if argv[:1] == ["serve"] else argv)
    from trtllm_bdlora.cli import build_parser

    args = build_parser().parse_args(["serve", *flags])  # --help and bad flags: the CLI's own messages and exit codes
    if args.backend == "torch":
        steps = [["trtllm-bdlora", "serve", *flags]]
    else:
        problem = None if env.get("DRY_RUN") else _pinned_stack_problem()
        if problem:
            print(f"entrypoint: {problem}", file=sys.stderr)
            return 2
        steps = trtllm_plan(args, env, engines_exist(env.get("ENGINE_DIR", "/engines"), args.tp))
    for step in steps:
        print("+ " + " ".join(step), flush=True)
        if env.get("DRY_RUN"):
            continue
        if step is steps[-1]:
            os.execvp(step[0], step)
        subprocess.run(step, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

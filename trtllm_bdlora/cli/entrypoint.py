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

import os
import re
import subprocess
import sys
from pathlib import Path

from trtllm_bdlora.config import ServeConfig

DEFAULT_PLUGIN = "/opt/trtllm-bdlora/lib/libtrtllm_bdlora_plugin.so"
ENV_FLAGS = (("MODEL", "--model"), ("TP", "--tp"), ("BACKEND", "--backend"), ("DTYPE", "--dtype"),
             ("MAX_BATCH_SIZE", "--max-batch-size"), ("MAX_LORA_RANK", "--max-lora-rank"), ("HOST", "--host"),
             ("HTTP_PORT", "--http-port"), ("GRPC_PORT", "--grpc-port"), ("METRICS_PORT", "--metrics-port"),
             ("OPENAI_PORT", "--openai-port"))
# serve settings the Triton route passes on to build / fill-model-repo / launch-triton
TRITON_ROUTE = {"engine.model", "engine.tp", "engine.backend", "engine.dtype", "engine.max_batch_size",
                "engine.max_lora_rank", "server.grpc_port", "server.http_port", "server.metrics_port", "server.settings"}
# serve settings the Triton route has no use for (ServeConfig field -> flag): refused there rather than dropped
TORCH_ONLY = {"engine.scheme": "--scheme", "engine.adapters": "--adapter", "engine.max_loras": "--max-loras",
              "engine.device": "--device", "engine.lora_cache_host_bytes": "--lora-cache-host-bytes",
              "engine.pin_adapters": "--no-pin-adapters", "engine.comm_interface": "--comm-interface",
              "engine.max_num_tokens": "--max-num-tokens", "engine.allow_request_adapters": "--no-allow-request-adapters",
              "engine.enable_prefix_caching": "--no-enable-prefix-caching",
              "server.host": "--host", "server.max_queue": "--max-queue", "server.shutdown_timeout": "--shutdown-timeout",
              "server.max_streams": "--max-streams", "server.openai_port": "--openai-port",
              "server.served_model_name": "--served-model-name", "server.allow_adapter_loading": "--allow-adapter-loading",
              "server.adapter_root": "--adapter-root",
              "server.allow_startup_adapter_unload": "--allow-startup-adapter-unload", "log.level": "--log-level",
              "log.format": "--log-format", "edge.max_connections": "--max-connections",
              "edge.header_timeout": "--request-header-timeout", "edge.body_timeout": "--request-body-timeout",
              "edge.keep_alive_timeout": "--keep-alive-timeout", "edge.max_keep_alive_requests": "--max-keep-alive-requests",
              "edge.grpc_max_connection_idle": "--grpc-max-connection-idle",
              "edge.grpc_max_connection_age": "--grpc-max-connection-age", "edge.max_body_bytes": "--max-body-bytes",
              "edge.api_keys": "--api-key / API_KEY",  # never dropped silently: Triton itself has no API keys
              "edge.allowed_origins": "--allowed-origins", "engine.threads_per_rank": "--threads-per-rank",
              "engine.kv_cache_bytes": "--kv-cache-bytes", "engine.rank_timeout": "--rank-timeout"}


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


def _setting(config, path: str):
    section, field = path.split(".")
    return getattr(getattr(config, section), field)


def trtllm_plan(config: ServeConfig, env: dict[str, str], engines_exist: bool) -> list[list[str]]:
    """build (if needed), fill-model-repo, launch-triton for `serve --backend trtllm` flags."""
    from trtllm_bdlora.llama.loader import EMBEDDED

    default = ServeConfig()
    unused = [flag for path, flag in TORCH_ONLY.items() if _setting(config, path) != _setting(default, path)]
    if unused:
        raise SystemExit(f"entrypoint: {', '.join(unused)}: not used by --backend trtllm (Triton serves the engines; "
                         "adapters are registered by the first request that carries lora_weights and lora_config)")
    engine, server = config.engine, config.server
    if engine.model == EMBEDDED:
        raise SystemExit("entrypoint: set MODEL (or --model) to a Hugging Face Llama directory mounted into the container")
    tp, engine_dir, repo = str(engine.tp), env.get("ENGINE_DIR", "/engines"), env.get("MODEL_REPO", "/model_repo")
    plugin = env.get("PLUGIN_LIB", DEFAULT_PLUGIN)
    max_lora_rank = str(engine.max_lora_rank or 64)
    steps = []
    if not engines_exist:
        build = ["trtllm-bdlora", "build", "--model", engine.model, "--tp", tp, "--output", engine_dir, "--plugin-lib",
                 plugin, "--max-lora-rank", max_lora_rank, "--max-batch-size", str(engine.max_batch_size),
                 "--dtype", engine.dtype, "--overwrite"]
        steps.append(["mpirun", "--allow-run-as-root", "-n", tp] + build if engine.tp > 1 else build)
    steps.append(["trtllm-bdlora", "fill-model-repo", "--engine-dir", engine_dir, "--tokenizer-dir", engine.model,
                  "--output", repo, "--max-batch-size", str(engine.max_batch_size), "--max-lora-rank", max_lora_rank]
                 + [word for item in server.settings for word in ("--set", item)])  # the repository serve answers as
    steps.append(["trtllm-bdlora", "launch-triton", "--world-size", tp, "--model-repo", repo, "--plugin-lib", plugin,
                  "--grpc-port", str(server.grpc_port), "--http-port", str(server.http_port),
                  "--metrics-port", str(server.metrics_port)])
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
    from trtllm_bdlora.cli import command_names, parse_config
    from trtllm_bdlora.errors import BdLoraError

    env = dict(os.environ)
    if argv and argv[0] != "serve" and not argv[0].startswith("-"):
        command = ["trtllm-bdlora", *argv] if argv[0] in command_names() else argv
        os.execvp(command[0], command)
    flags = serve_flags(env, argv[1:] if argv[:1] == ["serve"] else argv)
    try:  # --help and bad flags: the CLI's own messages and exit codes
        _, config = parse_config(["serve", *flags])
    except BdLoraError as err:
        print(f"trtllm-bdlora serve: error: {err}", file=sys.stderr)
        return 2
    if config.engine.backend == "torch":
        steps = [["trtllm-bdlora", "serve", *flags]]
    else:
        problem = None if env.get("DRY_RUN") else _pinned_stack_problem()
        if problem:
            print(f"entrypoint: {problem}", file=sys.stderr)
            return 2
        steps = trtllm_plan(config, env, engines_exist(env.get("ENGINE_DIR", "/engines"), config.engine.tp))
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

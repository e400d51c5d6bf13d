"""`serve`: Triton's KServe v2 endpoints for TensorRT-LLM's inflight_batcher_llm models, Prometheus metrics and an
OpenAI-compatible API, on the torch engine."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from trtllm_bdlora.cli.flags import Flags, add_engine_flags, add_log_flags, build, command, section_values
from trtllm_bdlora.cli.launching import Invocation, run_on_ranks
from trtllm_bdlora.config import (
    EdgeSettings,
    EngineConfig,
    LogConfig,
    ServeConfig,
    ServerConfig,
    lora_kernel_from_env,
    split_keys,
    split_origins,
)

DEFAULT_MAX_CONNECTIONS, HEALTH_RESERVE, METRICS_MAX_CONNECTIONS = 1000, 8, 64  # serving/edge/settings.py's, for --help


def add_commands(sub) -> None:
    p = command(sub, "serve",
                help="Triton's KServe v2 gRPC + HTTP endpoints for TensorRT-LLM's inflight_batcher_llm models, "
                     "Prometheus metrics and an OpenAI-compatible API",
                description="Answer as Triton serving TensorRT-LLM's inflight_batcher_llm repository (models ensemble, "
                            "preprocessing, tensorrt_llm, postprocessing, tensorrt_llm_bls) over KServe v2 gRPC and "
                            "HTTP, with Triton's Prometheus metrics, and as an OpenAI-compatible API where a request's "
                            "`model` picks the adapter. Every flag, path and port is checked before any rank starts. "
                            "SIGINT/SIGTERM finish in-flight work (--shutdown-timeout) and exit. See README.md and "
                            "docs/operations.md.",
                configure=serve_config, run=run_serve)
    add_engine_flags(p)
    flags = Flags(p, ServerConfig, "server", title="endpoints")
    flags.add("--host", help="address every endpoint binds to")
    flags.add("--http-port", type=int, help="KServe v2 HTTP/REST, on Triton's port")
    flags.add("--grpc-port", type=int, help="KServe v2 gRPC, on Triton's port")
    flags.add("--metrics-port", type=int, help="Prometheus metrics, on Triton's port")
    flags.add("--openai-port", type=int, help="OpenAI-compatible HTTP API (/v1/...)")
    flags.add("--max-queue", type=int, help="requests waiting for the engine before new ones get 'server busy' "
                                            "(RESOURCE_EXHAUSTED / 429)")
    flags.add("--max-streams", type=int, help="concurrent gRPC ModelStreamInfer streams; more get RESOURCE_EXHAUSTED "
                                              "(health never waits)")
    flags.add("--shutdown-timeout", type=float, metavar="SECONDS",
              help="on SIGTERM, seconds to finish in-flight work; then the rest is cut with an error and serve exits")
    flags = Flags(p, ServerConfig, "server", title="OpenAI API")
    flags.add("--served-model-name", metavar="NAME", help="the base model's OpenAI model name (default: --model)")
    flags.add("--allow-adapter-loading", action="store_true",
              help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (directories under --adapter-root)")
    flags.add("--adapter-root", metavar="DIR",
              help="the only directory tree adapters may be loaded from at run time (needs --allow-adapter-loading)")
    flags.add("--allow-startup-adapter-unload", action="store_true",
              help="let /v1/unload_lora_adapter unload the --adapter adapters too (else they stay for the server's "
                   "life; needs --allow-adapter-loading)")
    flags = Flags(p, ServerConfig, "server", title="KServe model repository")
    flags.add("--set", field="settings", action="append", metavar="KEY=VALUE",
              help="answer as the repository `fill-model-repo --set KEY=VALUE` writes, e.g. decoupled_mode=false "
                   "(unary calls to the ensemble, refused by Triton while it is decoupled); repeat for more")
    _add_edge_flags(p)
    add_log_flags(p, LogConfig())


def _add_edge_flags(p: argparse.ArgumentParser) -> None:
    """Connection limits, timeouts, the body limit, API keys and CORS of every listener (serving/edge/;
    docs/reliability.md compares them with Triton's and vLLM's)."""
    d = EdgeSettings()
    flags = Flags(p, EdgeSettings, "edge", title="connections, limits and access (every listener)")
    flags.add("--max-connections", type=int, metavar="N",
              help=f"open connections per listener (KServe HTTP, OpenAI, gRPC; metrics at most {METRICS_MAX_CONNECTIONS}): "
                   f"at the cap a new HTTP connection replaces the one idle the longest, and {HEALTH_RESERVE} more are "
                   f"kept for health requests (default {DEFAULT_MAX_CONNECTIONS}, lowered to fit `ulimit -n`)")
    flags.add("--request-header-timeout", field="header_timeout", type=float, metavar="S",
              help="seconds a client has to send a whole request head (gRPC: the HTTP/2 handshake)")
    flags.add("--request-body-timeout", field="body_timeout", type=float, metavar="S",
              help="seconds a client has to send a whole request body after its head; then 408")
    flags.add("--keep-alive-timeout", type=float, metavar="S",
              help=f"seconds an idle HTTP connection stays open between requests (default {d.keep_alive_timeout:g}, "
                   "uvicorn's and vLLM's)")
    flags.add("--max-keep-alive-requests", type=int, metavar="N",
              help=f"requests on one HTTP connection before it is closed (default {d.max_keep_alive_requests}, nginx's)")
    flags.add("--grpc-max-connection-idle", type=float, metavar="S",
              help=f"seconds a gRPC connection without calls stays open; then GOAWAY (default "
                   f"{d.grpc_max_connection_idle:g}; 0: never)")
    flags.add("--grpc-max-connection-age", type=float, metavar="S",
              help="seconds a gRPC connection may live; then GOAWAY, its calls finish within as long again (default 0: "
                   "never; Triton's --grpc-max-connection-age, in seconds)")
    flags.add("--max-body-bytes", type=int, metavar="BYTES",
              help=f"largest HTTP request body on every HTTP port, refused with 413 before it is read (default "
                   f"{d.max_body_bytes}, Triton's 64 MiB)")
    flags.add("--api-key", field="api_keys", action="append", metavar="KEY",
              help="require `Authorization: Bearer KEY` (gRPC: `authorization` metadata) on every endpoint but health "
                   "and metrics; repeat (or separate with commas) for several keys; default: the API_KEY environment "
                   "variable, else no key")
    flags.add("--allowed-origins", field="allowed_origins", action="append", metavar="ORIGINS",
              help="browser origins allowed by CORS on the KServe HTTP and OpenAI ports (comma-separated or a JSON list, "
                   "* for any; default none: no CORS headers)")


def serve_config(ns: argparse.Namespace) -> ServeConfig:
    edge = section_values(ns, "edge")
    edge["api_keys"] = split_keys(edge["api_keys"], os.environ)  # API_KEY: read once, here
    edge["allowed_origins"] = split_origins(edge["allowed_origins"])
    return ServeConfig(engine=build(EngineConfig, ns, "engine", lora_kernel=lora_kernel_from_env()),
                       server=build(ServerConfig, ns, "server"), edge=EdgeSettings(**edge),
                       log=build(LogConfig, ns, "log", progress_bars=sys.stderr.isatty()))


def run_serve(config: ServeConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.serving import server

    # the launcher passes SIGINT/SIGTERM to rank 0 as SIGUSR1: rank 0 drains and stops the others
    return run_on_ranks(invocation, config.engine.tp, config.engine.comm_interface, lambda: server.preflight(config),
                        lambda: server.serve(config), graceful_signal=signal.SIGUSR1)

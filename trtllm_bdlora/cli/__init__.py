"""The `trtllm-bdlora` command. Each subcommand lives in its own module, imported lazily."""

from __future__ import annotations

import argparse
import json
import sys

from trtllm_bdlora.errors import BdLoraError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class AdapterArg(tuple):
    """`(task_id, directory)` as the engine unpacks it, plus `name`: the adapter's OpenAI model name."""

    name: str

    def __new__(cls, task_id: int, directory: str, name: str | None = None) -> AdapterArg:
        arg = super().__new__(cls, (task_id, directory))
        arg.name = name or str(task_id)
        return arg


def parse_adapter_arg(text: str) -> AdapterArg:
    """`ID=DIR` or `NAME:ID=DIR`, ID a positive integer task id (as TensorRT-LLM's lora_task_id); the OpenAI API
    names the adapter NAME, or ID when no NAME is given."""
    head, sep, directory = text.partition("=")
    name, colon, task_id = head.rpartition(":")
    if not sep or not directory or not task_id.isdigit() or int(task_id) < 1 or (colon and not name):
        raise argparse.ArgumentTypeError(f"expected ID=DIR or NAME:ID=DIR with ID a positive integer, got {text!r}")
    if name.isdigit() and int(name) != int(task_id):
        raise argparse.ArgumentTypeError(f"adapter NAME must not be a number (numbers name task ids), got {text!r}")
    if name and (not name.isprintable() or name != name.strip() or len(name) > 256):
        raise argparse.ArgumentTypeError(f"adapter NAME must be printable text without surrounding spaces, got {name!r}")
    return AdapterArg(int(task_id), directory, name or None)


def cmd_inspect(args: argparse.Namespace) -> int:
    from trtllm_bdlora.adapters import load_peft_adapter
    from trtllm_bdlora.sharding.report import format_report, inspect_report

    shape = None
    if args.model:
        from trtllm_bdlora.llama.loader import load_model_config

        shape = load_model_config(args.model)
    adapter = load_peft_adapter(args.adapter_dir, model_shape=shape)
    report = inspect_report(adapter, args.tp, shape)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="HF Llama directory or 'smollm2-135m' (default)")
    p.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel ranks: started as N processes on this machine, or joins an mpirun launch of N")
    p.add_argument("--scheme", choices=["bdlora", "slora", "replicated"], default="bdlora")
    p.add_argument("--backend", choices=["torch", "trtllm"], default="torch")
    p.add_argument("--adapter", type=parse_adapter_arg, action="append", default=[], metavar="[NAME:]ID=DIR",
                   help="register the PEFT adapter in DIR as lora_task_id ID (OpenAI model name NAME, else ID)")
    p.add_argument("--max-loras", type=_positive_int, default=8, help="adapter slots per rank")
    p.add_argument("--max-batch-size", type=_positive_int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads-per-rank", type=_positive_int, default=None, metavar="N",
                   help="torch threads of every rank (default: the cores this process may use, divided by --tp)")
    p.add_argument("--kv-cache-bytes", type=_positive_int, default=None, metavar="BYTES",
                   help="KV cache per rank, as vLLM's VLLM_CPU_KVCACHE_SPACE: requests are admitted while it can hold "
                        "them at their longest (prompt + max_tokens), one too long for all of it is refused; memory "
                        "is taken only as it is written (default 4 GiB)")
    _add_reliability_args(p)


def _add_reliability_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-lora-rank", type=_positive_int, default=None,
                   help="largest adapter rank served; sizes the device slots once at start-up "
                        "(default: the torch build's, else 64 as TensorRT-LLM's engines)")
    p.add_argument("--lora-cache-host-bytes", type=_positive_int, default=1 << 30, metavar="BYTES",
                   help="host memory per rank for registered adapters, as TensorRT-LLM's lora_cache_host_memory_bytes "
                        "(default 1 GiB); least recently used adapters no unfinished request uses are evicted")
    p.add_argument("--pin-adapters", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the --adapter adapters in the host cache for good (default); --no-pin-adapters lets "
                        "them be evicted like adapters registered by requests")
    p.add_argument("--comm-interface", default=None, metavar="IFACE",
                   help="network interface the ranks' process group binds to (default: loopback, one machine); "
                        "name the interface the machines share for a multi-node mpirun launch")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _add_edge_args(p: argparse.ArgumentParser) -> None:
    """Connection limits, timeouts, the body limit, API keys and CORS of every listener (serving/edge/;
    docs/reliability.md compares them with Triton's and vLLM's)."""
    from trtllm_bdlora.serving.edge.settings import DEFAULT_MAX_CONNECTIONS, EdgeSettings

    d = EdgeSettings()
    g = p.add_argument_group("connections, limits and access (every listener)")
    g.add_argument("--max-connections", type=_positive_int, default=None, metavar="N",
                   help=f"open connections per listener (KServe HTTP, OpenAI, gRPC; metrics at most 64): at the cap a "
                        f"new HTTP connection replaces the one idle the longest, and 8 more are kept for health requests "
                        f"(default {DEFAULT_MAX_CONNECTIONS}, lowered to fit `ulimit -n`)")
    g.add_argument("--request-header-timeout", type=_seconds, default=d.header_timeout, metavar="S",
                   help=f"seconds a client has to send a whole request head (gRPC: the HTTP/2 handshake) "
                        f"(default {d.header_timeout:g})")
    g.add_argument("--request-body-timeout", type=_seconds, default=d.body_timeout, metavar="S",
                   help=f"seconds a client has to send a whole request body after its head; then 408 (default "
                        f"{d.body_timeout:g})")
    g.add_argument("--keep-alive-timeout", type=_seconds, default=d.keep_alive_timeout, metavar="S",
                   help=f"seconds an idle HTTP connection stays open between requests (default {d.keep_alive_timeout:g}, "
                        "uvicorn's and vLLM's)")
    g.add_argument("--max-keep-alive-requests", type=_positive_int, default=d.max_keep_alive_requests, metavar="N",
                   help=f"requests on one HTTP connection before it is closed (default {d.max_keep_alive_requests}, nginx's)")
    g.add_argument("--grpc-max-connection-idle", type=_seconds, default=d.grpc_max_connection_idle, metavar="S",
                   help=f"seconds a gRPC connection without calls stays open; then GOAWAY (default "
                        f"{d.grpc_max_connection_idle:g}; 0: never)")
    g.add_argument("--grpc-max-connection-age", type=_seconds, default=d.grpc_max_connection_age, metavar="S",
                   help="seconds a gRPC connection may live; then GOAWAY, its calls finish within as long again "
                        "(default 0: never; Triton's --grpc-max-connection-age, in seconds)")
    g.add_argument("--max-body-bytes", type=_positive_int, default=d.max_body_bytes, metavar="BYTES",
                   help=f"largest HTTP request body on every HTTP port, refused with 413 before it is read (default "
                        f"{d.max_body_bytes}, Triton's 64 MiB)")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` (gRPC: `authorization` metadata) on every endpoint but "
                        "health and metrics; repeat (or separate with commas) for several keys; default: the API_KEY "
                        "environment variable, else no key")
    g.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGINS",
                   help="browser origins allowed by CORS on the KServe HTTP and OpenAI ports (comma-separated or a JSON "
                        "list, * for any; default none: no CORS headers)")


def _add_scheduling_args(p: argparse.ArgumentParser, log_level: str) -> None:
    p.add_argument("--max-num-tokens", type=_positive_int, default=None, metavar="N",
                   help="token budget of one engine step, as TensorRT-LLM's max_num_tokens: decoding sequences get "
                        "their token first, prompts are prefilled in chunks in what is left (default 2048 on a GPU, "
                        "256 on a CPU)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=log_level,
                   help=f"stderr log level; info adds one access line per request and adapter "
                        f"registrations / evictions (default {log_level}; see docs/reliability.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trtllm-bdlora",
        description="Serve many (BD-)LoRA adapters on one Llama base under tensor parallelism.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a PEFT adapter and its per-rank cost under each TP scheme")
    p.add_argument("adapter_dir")
    p.add_argument("--tp", type=_positive_int, default=None)
    p.add_argument("--model", default=None, help="check shapes against this base model too")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="run JSON-lines requests through the engine")
    _add_engine_args(p)
    p.add_argument("--requests", required=True, help="JSON-lines file, or - for stdin")
    p.add_argument("--stats", action="store_true", help="add per-step collective accounting to the output")
    _add_scheduling_args(p, "warning")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.engine.generate", fromlist=["main"]).main(a))

    p = sub.add_parser("serve", help="Triton's KServe v2 gRPC + HTTP endpoints for TensorRT-LLM's inflight_batcher_llm "
                                     "models (ensemble, preprocessing, tensorrt_llm, postprocessing, tensorrt_llm_bls) "
                                     "and an OpenAI-compatible API")
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address every endpoint binds to")
    p.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP/REST (Triton's default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC (Triton's default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (Triton's default 8002)")
    p.add_argument("--max-queue", type=_positive_int, default=256, help="queued requests before 'server busy'")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds to finish in-flight work on SIGTERM; then the rest is cut with an error and serve exits")
    p.add_argument("--max-streams", type=_positive_int, default=128,
                   help="concurrent gRPC ModelStreamInfer streams; more get RESOURCE_EXHAUSTED (health never waits)")
    p.add_argument("--allow-request-adapters", action=argparse.BooleanOptionalAction, default=True,
                   help="register adapters sent with requests (lora_task_id + lora_weights + lora_config), as Triton "
                        "does; --no-allow-request-adapters serves only the --adapter ids")
    p.add_argument("--openai-port", type=int, default=9000, help="OpenAI-compatible HTTP API (/v1/...) on --host")
    p.add_argument("--served-model-name", default=None, help="the base model's OpenAI model name (default: --model)")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (directories under --adapter-root)")
    p.add_argument("--adapter-root", default=None, help="the only directory tree adapters may be loaded from at run time")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="answer as the repository `fill-model-repo --set KEY=VALUE` writes, e.g. decoupled_mode=false")
    _add_edge_args(p)
    _add_scheduling_args(p, "info")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.serving.server", fromlist=["main"]).main(a))

    p = sub.add_parser("client", help="send one request to a serve / Triton endpoint with tritonclient")
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--text", required=True)
    p.add_argument("--max-tokens", type=_positive_int, default=64)
    p.add_argument("--adapter", type=int, default=None, help="lora_task_id")
    p.add_argument("--adapter-dir", default=None, help="PEFT adapter to convert and send if the server lacks it")
    p.add_argument("--tp", type=_positive_int, default=1, help="the server's TP (for --adapter-dir conversion)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--api-key", default=None, help="the server's API key (default: the first key of API_KEY)")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.cli.client", fromlist=["main"]).main(a))

    p = sub.add_parser("fill-model-repo", help="fill model_repo/ (Triton inflight_batcher_llm layout) for an engine")
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--max-batch-size", type=_positive_int, default=64)
    p.add_argument("--max-lora-rank", type=_positive_int, default=None,
                   help="the engines' max_lora_rank (default: read from the engine directory, else 64)")
    p.add_argument("--tp", type=_positive_int, default=None,
                   help="the engines' TP (default: read from the engine directory's bdlora_build.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other ${placeholder} of the configs, e.g. lora_weights_data_type=TYPE_BF16")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.trtllm.triton_repo", fromlist=["x"]).fill_main(a))

    p = sub.add_parser("launch-triton", help="one tritonserver per rank under mpirun, BD-LoRA plugin preloaded (TensorRT "
                                             "engines); one tritonserver for a torch build")
    p.add_argument("--world-size", type=_positive_int, default=None, help="ranks of the TensorRT engines")
    p.add_argument("--model-repo", required=True)
    p.add_argument("--plugin-lib", default="/opt/trtllm-bdlora/lib/libtrtllm_bdlora_plugin.so")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--host", default=None, help="torch build: the address every endpoint binds to (default: Triton's)")
    p.add_argument("--tritonserver-arg", action="append", metavar="ARG", help="torch build: pass ARG to tritonserver")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.trtllm.triton_repo", fromlist=["x"]).launch_main(a))

    p = sub.add_parser("bench", help="decode step time: no LoRA vs bdlora vs slora vs replicated")
    _add_engine_args(p)
    p.add_argument("--batch", type=_positive_int, default=8)
    p.add_argument("--steps", type=_positive_int, default=16)
    p.add_argument("--prompt-len", type=_positive_int, default=32)
    p.add_argument("--num-adapters", type=_positive_int, default=4)
    p.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank of the random BD adapters")
    p.add_argument("--threads", type=_positive_int, dest="threads_per_rank", help="the same as --threads-per-rank")
    p.add_argument("--json", default=None, help="also write the results (median, quartiles, min/max) here")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.perf.bench", fromlist=["main"]).main(a))

    from trtllm_bdlora.perf.project import add_parser as add_project_parser

    add_project_parser(sub)

    p = sub.add_parser("build", help="build one TensorRT-LLM engine per rank with BD-LoRA plugins (or torch shards)")
    p.add_argument("--model", required=True, help="HF Llama directory or 'smollm2-135m'")
    p.add_argument("--tp", type=_positive_int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--backend", choices=["trtllm", "torch"], default="trtllm")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--max-lora-rank", type=int, default=64,
                   help="largest adapter rank a request may carry: r for a BD-LoRA adapter, tp*r for a plain LoRA "
                        "(sent in BD-shaped form); check with --adapter-dir")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="a PEFT adapter this engine will serve: refuse the build if it cannot fit --max-lora-rank")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-input-len", type=int, default=2048)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--plugin-lib", default="plugins/build/libtrtllm_bdlora_plugin.so")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.trtllm.build", fromlist=["main"]).main(a))

    p = sub.add_parser("convert-adapter", help="PEFT adapter -> TensorRT-LLM lora_weights / lora_config .npy")
    p.add_argument("adapter_dir")
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="the engine's dtype (default: the --engine-dir's, else float16); bfloat16 is stored as V2 bits")
    p.add_argument("--tp", type=_positive_int, default=None,
                   help="TP of the BD-LoRA engines (default: the --engine-dir's, else 1): plain LoRA modules are "
                        "written in BD-shaped form of rank TP*r for it")
    p.add_argument("--max-lora-rank", type=_positive_int, default=None,
                   help="the engine's max_lora_rank: refuse modules written with a larger rank")
    p.add_argument("--engine-dir", default=None, help="read TP, max_lora_rank and dtype from this engine directory")
    p.add_argument("--model", default=None, help="check shapes against this base model too")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.trtllm.convert", fromlist=["main"]).main(a))

    p = sub.add_parser("aot", help="compile the BD-LoRA Triton kernel ahead of time (PTX, cubin, C) for the plugin")
    p.add_argument("--output", required=True)
    p.add_argument("--arch", default="sm_80,sm_90")
    p.add_argument("--dtype", default="float16,bfloat16,float32")
    p.add_argument("--block-r", default="16,32,64,128", help="rank tile sizes to build (max per-rank rank)")
    p.add_argument("--require-pinned-triton", action="store_true",
                   help="refuse a triton other than trtllm_bdlora.versions.TRITON_KERNEL_COMPILER (the plugin build)")
    p.set_defaults(func=lambda a: __import__("trtllm_bdlora.kernels.aot", fromlist=["main"]).main(a))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "log_level", None):
        from trtllm_bdlora.logs import configure_logging

        configure_logging(args.log_level)
    from trtllm_bdlora.distributed.launch import mpi_world_size, run_rank

    if mpi_world_size() is not None:  # one rank of a multi-rank launch: report failures once, exit at once
        return run_rank(args)
    try:
        return int(args.func(args) or 0)
    except BdLoraError as err:
        print(f"trtllm-bdlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

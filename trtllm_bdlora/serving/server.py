"""`trtllm-bdlora serve`: every rank builds its engine; rank 0 runs the runtime and the endpoints: KServe v2
gRPC (--grpc-port 8001) and HTTP (--http-port 8000) for the five inflight_batcher_llm models, and Prometheus
metrics (--metrics-port 8002), all bound to --host."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

from trtllm_bdlora.distributed.hosts import check_hosts_agree
from trtllm_bdlora.distributed.launch import exit_now, init_ranks, mpi_world_size, shutdown
from trtllm_bdlora.errors import BdLoraError

# SIGUSR1 is what `serve --tp N`'s launcher sends rank 0 on SIGINT/SIGTERM; send it to a user-run mpirun for a graceful stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def main(args: argparse.Namespace) -> int:
    if args.backend == "trtllm":
        raise BdLoraError("--backend trtllm is served by Triton itself: see `trtllm-bdlora launch-triton` and model_repo/")
    from trtllm_bdlora.serving.edge.settings import connection_cap, edge_settings
    from trtllm_bdlora.serving.openai.api import check_args
    from trtllm_bdlora.serving.repository.repository import repository_settings

    check_args(args)  # bad OpenAI flags fail before any rank starts
    connection_cap(edge_settings(args).max_connections)  # and bad edge flags, or a cap `ulimit -n` cannot hold
    repository_settings(getattr(args, "set", None))  # and bad --set values
    if mpi_world_size() is None:
        from trtllm_bdlora.engine.engine import check_launch

        check_ports_free(args.host, {"--grpc-port": args.grpc_port, "--http-port": args.http_port,
                                     "--metrics-port": args.metrics_port})
        check_launch(args)  # before any rank starts
        if args.tp > 1:
            from trtllm_bdlora.distributed.launcher import relaunch_ranks

            return relaunch_ranks(args.tp, sys.argv[1:], args.comm_interface, graceful_signal=signal.SIGUSR1)
    from trtllm_bdlora.engine.engine import engine_from_args

    comm = init_ranks(args.tp, args.device, args.comm_interface, args.threads_per_rank)
    check_hosts_agree(comm, "serve", args)
    engine = engine_from_args(args, comm)
    if comm.rank != 0:  # workers stop when rank 0 says so, not on signals mpirun forwards
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        engine.follow()
        # rank 0 said stop: nothing is left to do. Tearing the process group down would wait on rank 0's store,
        # which may already be gone (the launcher then kills this rank after its grace period).
        exit_now(0)
    return _serve_rank0(args, engine, comm)


def _serve_rank0(args: argparse.Namespace, engine, comm) -> int:
    import torch

    from trtllm_bdlora.engine.runtime import Runtime
    from trtllm_bdlora.serving.edge.asgi import edge_app
    from trtllm_bdlora.serving.edge.listener import HttpServer, Listener
    from trtllm_bdlora.serving.edge.settings import METRICS_MAX_CONNECTIONS, connection_cap, edge_settings
    from trtllm_bdlora.serving.kserve import http as kserve_http
    from trtllm_bdlora.serving.kserve.capacity import Capacity
    from trtllm_bdlora.serving.kserve.grpc import start_server
    from trtllm_bdlora.serving.metrics import Metrics
    from trtllm_bdlora.serving.openai import api as openai_api
    from trtllm_bdlora.serving.openai.names import public_model_name
    from trtllm_bdlora.serving.openai.protocol import error_body
    from trtllm_bdlora.serving.repository.repository import ModelServer, repository_settings, serve_values

    settings = edge_settings(args)
    cap = connection_cap(settings.max_connections, raise_limit=True)
    _hide_host_paths(args)
    runtime = Runtime(engine, args.max_batch_size, args.max_queue, args.max_num_tokens).start()
    capacity = Capacity(streams=args.max_streams, unary=args.max_queue + args.max_batch_size)
    metrics = Metrics()
    metrics.watch(runtime)
    server = ModelServer(runtime, serve_values(args.model, public_model_name(args.model), args.tp,
                                               repository_settings(getattr(args, "set", None))), metrics)
    grpc_server, http_servers = None, []

    def listen(app, port: int, name: str, is_health, render, auth: bool = True, max_connections: int | None = None):
        listener = Listener(f"{name} :{port}", is_health, max_connections or cap)
        return HttpServer(edge_app(app, settings, is_health, render, auth), args.host, port, settings, listener).start()

    def stop_endpoints():  # all at once: a stop must fit in --shutdown-timeout + a few seconds
        for http in http_servers:
            http.begin_stop()
        stopped = grpc_server.stop(grace=1) if grpc_server is not None else None
        for http in http_servers:
            http.stop()
        if stopped is not None:
            stopped.wait()

    try:
        grpc_server = start_server(server, args.host, args.grpc_port, capacity, settings, cap)
        http_servers.append(listen(kserve_http.build_app(server, capacity.unary, settings.max_body_bytes),
                                   args.http_port, "KServe HTTP", kserve_http.is_health, kserve_http.error_document))
        http_servers.append(listen(kserve_http.build_metrics_app(metrics), args.metrics_port, "metrics",
                                   lambda path: path == "/metrics", kserve_http.error_document, auth=False,
                                   max_connections=min(cap, METRICS_MAX_CONNECTIONS)))
        http_servers.append(listen(openai_api.openai_app(runtime, args), args.openai_port, "OpenAI",
                                   openai_api.is_health, error_body))
    except BdLoraError:
        stop_endpoints()
        runtime.stop()
        shutdown(comm)
        raise
    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    print(f"trtllm-bdlora: serving {', '.join(sorted(server.models))} on {args.host} (gRPC {args.grpc_port}, "
          f"HTTP {args.http_port}, metrics {args.metrics_port}; tp {args.tp}, scheme {args.scheme}, "
          f"adapters {sorted(engine.pool.host)}; {torch.get_num_threads()} threads per rank, {args.dtype}, "
          f"KV cache {engine.kv_budget.tokens} tokens per rank)", flush=True)
    print(f"trtllm-bdlora: OpenAI API on http://{args.host}:{args.openai_port}/v1", flush=True)
    if not settings.api_keys and not _loopback(args.host):
        print(f"trtllm-bdlora: warning: serving on {args.host} without --api-key (or API_KEY): anyone who reaches "
              "these ports can run inference" + (" and load adapters" if args.allow_adapter_loading else ""), flush=True)
    while not stop.wait(0.2) and not runtime.stopped.is_set():
        pass
    forced = _drain_or_cut(runtime, args.shutdown_timeout)
    stop_endpoints()
    if forced:
        print(f"trtllm-bdlora serve: error: {forced}", file=sys.stderr, flush=True)
        exit_now(1)  # the engine thread is stuck in a step: the launcher stops the workers
    if runtime.failure:
        print(f"trtllm-bdlora serve: error: {runtime.failure}", file=sys.stderr, flush=True)
        return 1
    shutdown(comm)
    print("trtllm-bdlora: stopped", flush=True)
    exit_now(0)  # nothing is left to save; interpreter teardown (idle server threads, torch) only delays the exit


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _hide_host_paths(args: argparse.Namespace) -> None:
    """Clients see the model, the adapter root and --adapter directories by their names, never their host paths."""
    from pathlib import Path

    from trtllm_bdlora.errors import hide_path
    from trtllm_bdlora.llama.loader import resolve_model_dir
    from trtllm_bdlora.serving.openai.names import public_model_name

    shown = f"<model {public_model_name(args.model)}>"
    for path in (Path(args.model).absolute(), Path(args.model).resolve(), resolve_model_dir(args.model).resolve()):
        hide_path(str(path), shown)
    for adapter in args.adapter:
        for path in (Path(adapter[1]).absolute(), Path(adapter[1]).resolve()):
            hide_path(str(path), f"<adapter {getattr(adapter, 'name', adapter[0])}>")
    if args.adapter_root:
        for path in (Path(args.adapter_root).absolute(), Path(args.adapter_root).resolve()):
            hide_path(str(path), "<--adapter-root>")


CUT_GRACE_S = 10.0  # after --shutdown-timeout: how long the engine may take to reach a step boundary


def _drain_or_cut(runtime, timeout: float) -> str | None:
    """Let in-flight and queued requests finish for `timeout` seconds; then fail the rest with an error (clients
    get UNAVAILABLE / 503) and stop. Returns why the process must be ended by force, or None."""
    if runtime.stop(timeout=timeout):
        return None
    left = runtime.active + runtime.inbox.qsize()
    runtime.cut(f"server is shutting down: request cut after --shutdown-timeout {timeout:g} s")
    print(f"trtllm-bdlora: --shutdown-timeout {timeout:g} s passed: cutting {left} requests", flush=True)
    if runtime.stopped.wait(CUT_GRACE_S):
        return None
    return f"the engine did not reach a step boundary {CUT_GRACE_S:g} s after --shutdown-timeout; exiting"


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Refuse at once (before any rank starts) a port that is given twice or that another process listens on."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port in seen:
            raise BdLoraError(f"{flag} {port} is also {seen[port]}")
        seen[port] = flag
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no obstacle
            try:
                sock.bind((host, port))
            except OSError as err:
                raise BdLoraError(f"cannot listen on {host}:{port} ({flag}): {err.strerror}") from None

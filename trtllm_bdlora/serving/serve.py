"""`trtllm-bdlora serve`: every rank builds its engine; rank 0 runs the runtime and the endpoints: KServe v2
gRPC (--grpc-port 8001) and HTTP (--http-port 8000) for the five inflight_batcher_llm models, and Prometheus
metrics (--metrics-port 8002), all bound to --host."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from trtllm_bdlora.engine.launch import init_ranks, mpi_world_size, shutdown
from trtllm_bdlora.errors import BdLoraError

# SIGUSR1 is what `serve --tp N`'s launcher sends rank 0 on SIGINT/SIGTERM; send it to a user-run mpirun for a graceful stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def main(args: argparse.Namespace) -> int:
    if args.backend == "trtllm":
        raise BdLoraError("--backend trtllm is served by Triton itself: see `trtllm-bdlora launch-triton` and model_repo/")
    from trtllm_bdlora.serving.openai_api import check_args

    check_args(args)  # bad OpenAI flags fail before any rank starts
    if mpi_world_size() is None:
        from trtllm_bdlora.engine.engine import check_launch

        check_launch(args)  # before any rank starts
        if args.tp > 1:
            from trtllm_bdlora.engine.launcher import relaunch_ranks

            return relaunch_ranks(args.tp, sys.argv[1:], args.comm_interface, graceful_signal=signal.SIGUSR1)
    from trtllm_bdlora.engine.engine import engine_from_args

    comm = init_ranks(args.tp, args.device, args.comm_interface)
    engine = engine_from_args(args, comm)
    if comm.rank != 0:  # workers stop when rank 0 says so, not on signals mpirun forwards
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        try:
            engine.follow()
        finally:
            shutdown(comm)
        return 0
    return _serve_rank0(args, engine, comm)


def _serve_rank0(args: argparse.Namespace, engine, comm) -> int:
    from trtllm_bdlora.serving.grpc_server import start_server
    from trtllm_bdlora.serving.http_server import HttpServer, build_app, build_metrics_app
    from trtllm_bdlora.serving.metrics import Metrics
    from trtllm_bdlora.serving.model_server import ModelServer, serve_values
    from trtllm_bdlora.serving.openai_api import openai_app
    from trtllm_bdlora.serving.runtime import Runtime

    runtime = Runtime(engine, args.max_batch_size, args.max_queue, args.max_num_tokens).start()
    metrics = Metrics()
    metrics.watch(runtime)
    server = ModelServer(runtime, serve_values(args.model, args.tp, args.max_batch_size), metrics)
    grpc_server, http_servers = None, []

    def stop_endpoints():
        for http in http_servers:
            http.stop()
        if grpc_server is not None:
            grpc_server.stop(grace=2).wait()

    try:
        grpc_server = start_server(server, args.host, args.grpc_port)
        http_servers.append(HttpServer(build_app(server), args.host, args.http_port).start())
        http_servers.append(HttpServer(build_metrics_app(metrics), args.host, args.metrics_port).start())
        http_servers.append(HttpServer(openai_app(runtime, args), args.host, args.openai_port).start())
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
          f"adapters {sorted(engine.pool.host)})", flush=True)
    print(f"trtllm-bdlora: OpenAI API on http://{args.host}:{args.openai_port}/v1", flush=True)
    while not stop.wait(0.2) and not runtime.stopped.is_set():
        pass
    runtime.stop(timeout=args.shutdown_timeout)  # in-flight and queued requests finish first
    stop_endpoints()
    if runtime.failure:
        print(f"trtllm-bdlora serve: error: {runtime.failure}", file=sys.stderr, flush=True)
        return 1
    shutdown(comm)
    print("trtllm-bdlora: stopped", flush=True)
    return 0


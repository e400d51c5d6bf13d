"""`trtllm-bdlora serve`: every rank builds its engine; rank 0 runs the runtime and the endpoints: KServe v2
gRPC (--grpc-port 8001) and HTTP (--http-port 8000) for the five inflight_batcher_llm models, Prometheus metrics
(--metrics-port 8002) and the OpenAI-compatible API (--openai-port 9000), all bound to --host."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from trtllm_bdlora.config import ServeConfig
from trtllm_bdlora.distributed.hosts import check_hosts_agree
from trtllm_bdlora.distributed.launch import command_started, exit_now, init_ranks, ranks_spawned, report_rank_error, shutdown
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.logs import log_event, phase, startup

if TYPE_CHECKING:
    from trtllm_bdlora.adapters.files import AdapterRoot
    from trtllm_bdlora.serving.openai.names import AdapterNames

# SIGUSR1 is what `serve --tp N`'s launcher sends rank 0 on SIGINT/SIGTERM; send it to a user-run mpirun for a graceful stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
log = logging.getLogger("trtllm_bdlora.server")
# After a rank is lost: how long the endpoints keep answering "not ready" and UNAVAILABLE (every pending request
# already has its error) before serve exits and the launcher ends the other ranks.
LOST_RANK_LINGER_S = 2.0


def openai_names(config: ServeConfig) -> tuple[AdapterNames, AdapterRoot | None]:
    """The OpenAI API's model names and its run-time loading root; BdLoraError for bad ones. A --model path is
    listed by its directory's name; clients that send the path still reach the base model."""
    from trtllm_bdlora.serving.openai.names import AdapterNames, adapter_root, check_name, public_model_name

    server, model = config.server, config.engine.model
    base = server.served_model_name or public_model_name(model)
    check_name("--served-model-name" if server.served_model_name else "--model", base)
    aliases = () if server.served_model_name else (model,)
    names = AdapterNames(base, public_model_name(model) if server.served_model_name else base, config.engine.adapters,
                         aliases)
    return names, adapter_root(server.adapter_root, server.allow_adapter_loading)


def preflight(config: ServeConfig) -> None:
    """Everything that can be refused before any rank starts, as one line naming the flag, cheapest first: every
    port, the engine's arguments and paths and the model's shape, the OpenAI names and loading root, then the
    adapters read and checked against the model."""
    from trtllm_bdlora.engine.preflight import check_adapters, check_engine_setup
    from trtllm_bdlora.serving.edge.settings import connection_cap
    from trtllm_bdlora.serving.repository.repository import repository_settings

    check_ports_free(config.server.host, config.server.ports)
    connection_cap(config.edge.max_connections)  # a cap `ulimit -n` cannot hold
    repository_settings(config.server.settings)  # --set values the repository's configs cannot take
    check_engine_setup(config.engine)
    _, root = openai_names(config)
    if root is not None:  # opened to check it; serve opens it again on rank 0
        root.close()
    check_adapters(config.engine)


def serve(config: ServeConfig) -> int:
    """Run `serve` on this rank (all of it at TP 1, or one rank of a launch): every rank builds its engine; rank 0
    runs the runtime and the endpoints."""
    from trtllm_bdlora.distributed.launch import launch_rank

    if config.engine.backend == "trtllm":
        raise BdLoraError("--backend trtllm is served by Triton itself: see `trtllm-bdlora launch-triton` and model_repo/")
    names, root = openai_names(config)
    rank0 = launch_rank() == 0
    if rank0:  # checked again here: a user's mpirun starts the ranks without the launcher's checks
        check_ports_free(config.server.host, config.server.ports)
    engine_config = config.engine
    comm = init_ranks(engine_config.tp, engine_config.device, engine_config.comm_interface, engine_config.threads_per_rank,
                      engine_config.rank_timeout, "serve")
    check_hosts_agree(comm, "serve", engine_config)
    if comm.world > 1:  # the ranks' start: their processes (Python, torch) and the process group
        log_event(startup, "ranks started", logging.INFO if rank0 else logging.DEBUG, tp=engine_config.tp,
                  seconds=round(time.time() - ranks_spawned(), 1))
    from trtllm_bdlora.engine.engine import engine_from_config

    engine = engine_from_config(engine_config, comm)
    if comm.rank != 0:  # workers stop when rank 0 says so, not on signals mpirun forwards
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        engine.follow()
        # rank 0 said stop: nothing is left to do. Tearing the process group down would wait on rank 0's store,
        # which may already be gone (the launcher then kills this rank after its grace period).
        exit_now(0)
    return _serve_rank0(config, engine, comm, names, root)


class _Endpoints:
    """Rank 0's runtime and the four listeners, opened together and stopped together."""

    def __init__(self):
        self.runtime, self.models, self.grpc_server, self.http_servers = None, (), None, []

    def open(self, config: ServeConfig, engine, names: AdapterNames, root: AdapterRoot | None) -> None:
        from trtllm_bdlora.engine.runtime import Runtime
        from trtllm_bdlora.serving.edge.asgi import edge_app
        from trtllm_bdlora.serving.edge.listener import HttpServer, Listener
        from trtllm_bdlora.serving.edge.settings import METRICS_MAX_CONNECTIONS, connection_cap
        from trtllm_bdlora.serving.kserve import http as kserve_http
        from trtllm_bdlora.serving.kserve.capacity import Capacity
        from trtllm_bdlora.serving.kserve.grpc import start_server
        from trtllm_bdlora.serving.kserve.shm import SharedMemoryRegions
        from trtllm_bdlora.serving.metrics import Metrics
        from trtllm_bdlora.serving.openai import api as openai_api
        from trtllm_bdlora.serving.openai.names import public_model_name
        from trtllm_bdlora.serving.openai.protocol import error_body
        from trtllm_bdlora.serving.repository.repository import ModelServer, repository_settings, serve_values

        engine_config, server_config, settings = config.engine, config.server, config.edge
        host = server_config.host
        cap = connection_cap(settings.max_connections, raise_limit=True)
        _hide_host_paths(config)
        self.runtime = runtime = Runtime(engine, engine_config.max_batch_size, server_config.max_queue,
                                         engine_config.max_num_tokens,
                                         allow_startup_unload=server_config.allow_startup_adapter_unload).start()
        capacity = Capacity(streams=server_config.max_streams, unary=server_config.max_queue + engine_config.max_batch_size)
        metrics = Metrics()
        metrics.watch(runtime)
        server = ModelServer(runtime, serve_values(engine_config.model, public_model_name(engine_config.model),
                                                   engine_config.tp, repository_settings(server_config.settings)), metrics)
        self.models = sorted(server.models)
        regions = SharedMemoryRegions()  # system shared memory, one set for both KServe front ends (as Triton's)

        def listen(app, port: int, flag: str, name: str, is_health, render, auth: bool = True, max_connections=None):
            listener = Listener(f"{name} :{port}", is_health, max_connections or cap)
            return HttpServer(edge_app(app, settings, is_health, render, auth), host, port, settings, listener,
                              flag=flag).start()

        self.grpc_server = start_server(server, host, server_config.grpc_port, capacity, settings, cap, regions)
        self.http_servers.append(listen(kserve_http.build_app(server, capacity.unary, settings.max_body_bytes, regions),
                                        server_config.http_port, "--http-port", "KServe HTTP", kserve_http.is_health,
                                        kserve_http.error_document))
        self.http_servers.append(listen(kserve_http.build_metrics_app(metrics), server_config.metrics_port,
                                        "--metrics-port", "metrics", lambda path: path == "/metrics",
                                        kserve_http.error_document, auth=False,
                                        max_connections=min(cap, METRICS_MAX_CONNECTIONS)))
        self.http_servers.append(listen(openai_api.create_app(openai_api.OpenAIServer(runtime, names, root, metrics), metrics),
                                        server_config.openai_port, "--openai-port", "OpenAI", openai_api.is_health,
                                        error_body))

    def stop(self) -> None:
        """All at once: a stop must fit in --shutdown-timeout + a few seconds."""
        for http in self.http_servers:
            http.begin_stop()
        stopped = self.grpc_server.stop(grace=1) if self.grpc_server is not None else None
        for http in self.http_servers:
            http.stop()
        if stopped is not None:
            stopped.wait()


def _serve_rank0(config: ServeConfig, engine, comm, names: AdapterNames, root: AdapterRoot | None) -> int:
    import torch

    engine_config, server_config = config.engine, config.server
    endpoints = _Endpoints()
    try:
        with phase("opening the endpoints", host=server_config.host):
            endpoints.open(config, engine, names, root)
    except BdLoraError:
        endpoints.stop()
        if endpoints.runtime is not None:
            endpoints.runtime.stop()
        shutdown(comm)
        raise
    runtime = endpoints.runtime
    if comm.watch is not None:  # a hung rank: fail requests and readiness here, then leave (below)
        comm.watch.on_lost = lambda lost: runtime.rank_lost(lost.summary, str(lost))
    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    log_event(log, "serving", models=",".join(endpoints.models), host=server_config.host,
              grpc_port=server_config.grpc_port, http_port=server_config.http_port,
              metrics_port=server_config.metrics_port, openai=f"http://{server_config.host}:{server_config.openai_port}/v1",
              tp=engine_config.tp, scheme=engine_config.scheme, adapters=",".join(map(str, sorted(engine.pool.host))) or "-",
              threads_per_rank=torch.get_num_threads(), dtype=engine_config.dtype, kv_cache_tokens=engine.kv_budget.tokens,
              ready_seconds=round(time.time() - command_started(), 1))
    if not config.edge.api_keys and not _loopback(server_config.host):
        log_event(log, f"serving on {server_config.host} without --api-key (or API_KEY): anyone who reaches these ports "
                       "can run inference" + (" and load adapters" if server_config.allow_adapter_loading else ""),
                  logging.WARNING)
    while not stop.wait(0.2) and not runtime.stopped.is_set() and runtime.lost is None:
        pass
    if runtime.lost is not None:  # the engine thread is blocked in a collective with the lost rank
        time.sleep(LOST_RANK_LINGER_S)
        endpoints.stop()
        report_rank_error("serve", runtime.failure, secondary=bool(comm.watch and comm.watch.lost and
                                                                    comm.watch.lost.unreachable))
        exit_now(1)
    log_event(log, "stopping", in_flight=runtime.active, queued=runtime.inbox.qsize())
    forced = _drain_or_cut(runtime, server_config.shutdown_timeout)
    endpoints.stop()
    if forced:
        print(f"trtllm-bdlora serve: error: {forced}", file=sys.stderr, flush=True)
        exit_now(1)  # the engine thread is stuck in a step: the launcher stops the workers
    if runtime.failure and comm.world > 1:  # another rank died (the launcher names it) or a step failed
        report_rank_error("serve", runtime.failure, secondary=runtime.failure_lost_contact)
        exit_now(1)
    if runtime.failure:
        print(f"trtllm-bdlora serve: error: {runtime.failure}", file=sys.stderr, flush=True)
        return 1
    shutdown(comm)
    log_event(log, "stopped")
    exit_now(0)  # nothing is left to save; interpreter teardown (idle server threads, torch) only delays the exit


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _hide_host_paths(config: ServeConfig) -> None:
    """Clients see the model, the adapter root and --adapter directories by their names, never their host paths."""
    from trtllm_bdlora.errors import hide_path
    from trtllm_bdlora.llama.loader import resolve_model_dir
    from trtllm_bdlora.serving.openai.names import public_model_name

    model = config.engine.model
    shown = f"<model {public_model_name(model)}>"
    for path in (Path(model).absolute(), Path(model).resolve(), resolve_model_dir(model).resolve()):
        hide_path(str(path), shown)
    for spec in config.engine.adapters:
        for path in (Path(spec.directory).absolute(), Path(spec.directory).resolve()):
            hide_path(str(path), f"<adapter {spec.openai_name}>")
    root = config.server.adapter_root
    if root:
        for path in (Path(root).absolute(), Path(root).resolve()):
            hide_path(str(path), "<--adapter-root>")


CUT_GRACE_S = 10.0  # after --shutdown-timeout: how long the engine may take to reach a step boundary


def _drain_or_cut(runtime, timeout: float) -> str | None:
    """Let in-flight and queued requests finish for `timeout` seconds; then fail the rest with an error (clients
    get UNAVAILABLE / 503) and stop. Returns why the process must be ended by force, or None."""
    if runtime.stop(timeout=timeout):
        return None
    left = runtime.active + runtime.inbox.qsize()
    runtime.cut(f"server is shutting down: request cut after --shutdown-timeout {timeout:g} s")
    log_event(log, f"--shutdown-timeout {timeout:g} s passed: cutting the requests left", logging.WARNING, requests=left)
    if runtime.stopped.wait(CUT_GRACE_S):
        return None
    return f"the engine did not reach a step boundary {CUT_GRACE_S:g} s after --shutdown-timeout; exiting"


def check_distinct_ports(ports: dict[str, int]) -> None:
    """Refuse a port given to two endpoints."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port in seen:
            raise BdLoraError(f"{flag} {port} is also {seen[port]}")
        seen[port] = flag


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Refuse at once (before any rank starts) a port that is given twice or that another process listens on."""
    check_distinct_ports(ports)
    for flag, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no obstacle
            try:
                sock.bind((host, port))
            except socket.gaierror as err:
                raise BdLoraError(f"--host {host}: {err.strerror}") from None
            except OSError as err:
                raise BdLoraError(f"cannot listen on {host}:{port} ({flag}): {err.strerror}") from None

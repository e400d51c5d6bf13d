"""The `tensorrt_llm` model of a `build --backend torch` repository, inside Triton's Python backend: the C++
backend's interface (serving/repository/spec.py) and semantics (serving/repository/core.py) over the torch engine's
runtime, so a real `tritonserver` serves the repository without TensorRT.

- Decoupled (the repository's default): each request runs on its own thread and answers through its response
  sender, the last response flagged final; non-decoupled: `execute` answers its requests together.
- Cancellation: one thread polls `request.is_cancelled()` of the requests in flight (never after a request's
  final response: that crashes Triton 2.51) and the request leaves the batch at the next engine step.
- TP > 1: this process is rank 0 and starts ranks 1..N-1 as `trtllm-bdlora serve` workers (distributed/embedded.py).
  A rank that dies fails every pending request, as in `serve`, and then stops the server (SIGTERM to the
  `tritonserver` that runs this stub), as `serve` exits and as an MPI launch of the C++ backend aborts.
- One instance: it batches every request in flight; `instance_group` count > 1 would load the engine (and its
  ranks) once per instance and is refused when the model loads.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from trtllm_bdlora.config import EngineConfig
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.serving.repository.tokens import flag
from trtllm_bdlora.trtllm.triton_python import TritonCall, TritonCalls, parameters

log = logging.getLogger("trtllm_bdlora.triton")
DRAIN_S = 30.0  # at unload: how long in-flight requests may take to finish before they are cut


def torch_build(engine_dir: str) -> dict | None:
    """The build record of a `build --backend torch` output directory, or None for any other directory (a
    TensorRT-LLM engine directory, served by the C++ backend)."""
    from trtllm_bdlora.llama.loader import BUILD_FILE, read_build_info

    directory = Path(engine_dir)
    if not (directory / BUILD_FILE).is_file():
        return None
    try:
        return read_build_info(directory)
    except BdLoraError:
        return None


def _int(params: dict[str, str], key: str, default: int | None) -> int | None:
    value = params.get(key, "")
    if not value or value.startswith("${"):
        return default
    try:
        return int(value)
    except ValueError:
        raise BdLoraError(f"tensorrt_llm parameter {key} must be an integer, got {value!r}") from None


def engine_config(engine_dir: str, tp: int, params: dict[str, str]) -> EngineConfig:
    """The engine of every rank, as `serve --model ENGINE_DIR --tp N` builds it (`serve`'s defaults for what the
    C++ backend's parameters do not say), with the repository's adapter limits."""
    from trtllm_bdlora.config import lora_kernel_from_env

    values = {"model": engine_dir, "tp": tp, "max_lora_rank": _int(params, "lora_cache_max_adapter_size", None),
              "lora_kernel": lora_kernel_from_env()}  # as the workers' `serve` reads it
    host_bytes = _int(params, "lora_cache_host_memory_bytes", None)
    if host_bytes:
        values["lora_cache_host_bytes"] = host_bytes
    return EngineConfig(**values)


WORKER_FLAGS = {"model": "--model", "tp": "--tp", "scheme": "--scheme", "dtype": "--dtype", "max_loras": "--max-loras",
                "max_lora_rank": "--max-lora-rank", "lora_cache_host_bytes": "--lora-cache-host-bytes",
                "rank_timeout": "--rank-timeout"}


def worker_argv(config: EngineConfig) -> list[str]:
    """The command line of ranks 1..tp-1: `serve` workers (they build the same engine and follow rank 0's plans),
    with the values rank 0 checks they agree on (distributed/hosts.py) and the same rank watch."""
    argv = ["serve", "--log-level", "warning"]
    for name, option in WORKER_FLAGS.items():
        value = getattr(config, name)
        if value is not None:
            argv += [option, str(value)]
    return argv


class TritonCoreModel:
    """What model_repo/tensorrt_llm/1/model.py delegates to."""

    def __init__(self, pb_utils, args: dict):
        from trtllm_bdlora.engine.runtime import Runtime
        from trtllm_bdlora.logs import configure_logging
        from trtllm_bdlora.serving.repository.core import CoreModel

        configure_logging("info")  # one access line per request in the server's log, as `serve` writes them
        self.pb_utils = pb_utils
        config, params = parameters(args)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        count = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        if count != 1:
            raise BdLoraError(f"tensorrt_llm: instance_group count must be 1, got {count}: one instance batches every "
                              "request in flight, and each further one would load the engine and its ranks again")
        engine_dir = params.get("gpt_model_path", "")
        build = torch_build(engine_dir)
        if build is None:
            raise BdLoraError(f"tensorrt_llm: gpt_model_path {engine_dir!r} is not a `trtllm-bdlora build --backend "
                              "torch` output (TensorRT-LLM engines need the tensorrtllm backend)")
        config = engine_config(engine_dir, int(build["tp"]), params)
        self.ranks, self.runtime = None, None
        if config.tp > 1:
            from trtllm_bdlora.distributed.embedded import EmbeddedRanks
            from trtllm_bdlora.distributed.hosts import check_hosts_agree

            self.ranks = EmbeddedRanks(config.tp, worker_argv(config), config.device, config.comm_interface,
                                       on_lost=self._rank_lost, threads_per_rank=config.threads_per_rank,
                                       rank_timeout=config.rank_timeout, on_unresponsive=self._rank_unresponsive)
            comm = self.ranks.comm
            try:
                check_hosts_agree(comm, "serve", config)  # as every `serve` worker does first
            except BaseException:
                self.ranks.stop(0)
                raise
        else:
            from trtllm_bdlora.distributed.launch import init_ranks

            comm = init_ranks(1, config.device, threads_per_rank=config.threads_per_rank)
        try:
            from trtllm_bdlora.engine.engine import engine_from_config

            engine = engine_from_config(config, comm)
            self.runtime = Runtime(engine, max_batch_size=int(build.get("max_batch_size") or 16),
                                   max_num_tokens=config.max_num_tokens).start()
        except BaseException:
            if self.ranks is not None:
                self.ranks.stop(0)
            raise
        self.core = CoreModel(self.runtime, flag(params.get("exclude_input_in_output"), False),
                              flag(params.get("normalize_log_probs"), True), decoupled=self.decoupled)
        self.calls = TritonCalls(pb_utils, self.decoupled, self._run)
        self.stopping = threading.Event()
        threading.Thread(target=self._watch_runtime, name="bdlora-health", daemon=True).start()

    def execute(self, requests: list) -> list | None:
        return self.calls.execute(requests)

    def _run(self, call: TritonCall) -> None:
        for response in self.core.infer(call.inputs, call.ctx):
            if response.outputs or response.final:
                call.send(response.outputs, response.final)

    # ------------------------------------------------------------------ failure and shutdown
    def _rank_lost(self, cause: str) -> None:
        log.error("tensorrt_llm: %s", cause)

    def _rank_unresponsive(self, lost) -> None:
        """The rank watch (--rank-timeout, distributed/liveness.py) found a rank stopped, hung or cut off: as in
        `serve`, every pending and new request fails with UNAVAILABLE, and the server stops (`_watch_runtime`).
        While the engine loads there is no runtime yet: the load fails, naming the rank."""
        log.error("tensorrt_llm: %s", lost)
        if self.runtime is None:
            from trtllm_bdlora.distributed.launch import exit_on_lost

            exit_on_lost("tensorrt_llm")(lost)
        self.runtime.rank_lost(lost.summary, str(lost))

    def _watch_runtime(self) -> None:
        while not self.runtime.stopped.wait(0.2) and self.runtime.lost is None:
            pass
        if self.stopping.is_set() or self.runtime.failure is None:
            return
        if self.ranks is not None:  # the rank that died, rather than rank 0's lost contact with it
            deadline = time.monotonic() + 2.0
            while self.ranks.lost is None and time.monotonic() < deadline:
                time.sleep(0.1)
        cause = (self.ranks.lost if self.ranks is not None else None) or self.runtime.failure
        print(f"trtllm-bdlora tensorrt_llm: error: {cause}; stopping the server", flush=True)
        stop_server()

    def finalize(self) -> None:
        self.stopping.set()
        self.calls.stop()
        if self.ranks is not None:  # the workers leave when the runtime stops: no loss
            self.ranks.expect_exit()
        if self.runtime.lost is None and not self.runtime.stop(timeout=DRAIN_S):
            self.runtime.cut(f"server is shutting down: request cut after {DRAIN_S:g} s")
            self.runtime.stopped.wait(10)
        if self.ranks is not None:
            self.ranks.stop()


def stop_server() -> None:
    """SIGTERM to the `tritonserver` this stub belongs to (its parent): in-flight requests of other models finish,
    health turns not-ready, the process exits."""
    parent = os.getppid()
    try:
        name = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return
    if os.path.basename(name) == b"tritonserver":
        os.kill(parent, signal.SIGTERM)

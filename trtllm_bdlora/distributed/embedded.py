"""A TP group whose rank 0 is this process, for engines that live inside another program (a model in Triton's
Python backend stub), which cannot be relaunched as N ranks the way `serve --tp N` is.

Ranks 1..N-1 run `trtllm-bdlora <argv>` (e.g. `serve ...`, whose workers only follow rank 0's plans) under the
same variables this package's launcher passes (launcher.py): they bind to loopback (or `interface`), die with
this process (parent-death signal), and leave a fatal error in the run directory, which `cause()` reads. Every
rank runs the rank watch (liveness.py, `--rank-timeout`) as in any launch: a worker that exits is seen here at
once, one that stops or hangs within the timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trtllm_bdlora.config import DEFAULT_RANK_TIMEOUT_S
from trtllm_bdlora.distributed.launch import (
    LAUNCHER_ENV,
    RANK_CPP_LOG_LEVEL,
    RANK_ENV,
    RUN_DIR_ENV,
    STORE_ENV,
    STORE_FD_ENV,
    WORLD_ENV,
    init_ranks,
    interface_address,
)

FOLLOW_GRACE_S = 10.0  # after rank 0 stopped them: how long workers may take to exit before SIGKILL
WATCH_S = 0.2


class EmbeddedRanks:
    """Start ranks 1..tp-1, join the group as rank 0 (`comm`), watch the workers; `on_lost(cause)` is called once
    (from a watcher thread) when a worker exits unasked."""

    def __init__(self, tp: int, argv: list[str], device: str | None = None, interface: str | None = None,
                 on_lost=None, python: str | None = None, threads_per_rank: int | None = None,
                 rank_timeout: float = DEFAULT_RANK_TIMEOUT_S, on_unresponsive=None):
        """`rank_timeout`: the rank watch's (liveness.py), as `--rank-timeout`; `on_unresponsive(RankLost)` replaces
        its default answer (this process reports the rank and exits) once the group has formed."""
        self.tp, self.on_lost = tp, on_lost
        self.procs: list[subprocess.Popen] = []
        self.stopping = threading.Event()
        self.lost: str | None = None
        self.run_dir = Path(tempfile.mkdtemp(prefix="trtllm-bdlora-ranks-"))
        addr = interface_address(interface)
        listener = socket.create_server((addr, 0))
        store = f"{addr}:{listener.getsockname()[1]}"
        env = dict(os.environ, **{WORLD_ENV: str(tp), STORE_ENV: store, RUN_DIR_ENV: str(self.run_dir),
                                  LAUNCHER_ENV: str(os.getpid())})
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
        env.setdefault(*RANK_CPP_LOG_LEVEL)
        try:
            for rank in range(1, tp):
                self.procs.append(subprocess.Popen([python or sys.executable, "-m", "trtllm_bdlora", *argv],
                                                   env=dict(env, **{RANK_ENV: str(rank)}), stdin=subprocess.DEVNULL,
                                                   start_new_session=True))
            mine = {WORLD_ENV: str(tp), RANK_ENV: "0", STORE_ENV: store, STORE_FD_ENV: str(listener.detach())}
            saved = {k: os.environ.get(k) for k in mine}
            os.environ.update(mine)
            try:
                self.comm = init_ranks(tp, device, interface, threads_per_rank, rank_timeout, "tensorrt_llm")
            finally:  # this process is no rank of a launch for anything else it runs
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        except BaseException:
            listener.close()
            self.stop(0)
            raise
        if self.comm.watch is not None and on_unresponsive is not None:
            self.comm.watch.on_lost = on_unresponsive
        threading.Thread(target=self._watch, name="bdlora-ranks", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.is_set():
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None and not self.stopping.is_set():
                    time.sleep(WATCH_S)  # its report may still be on its way
                    self.lost = self.cause() or f"rank {rank} (pid {proc.pid}) exited with status {proc.returncode}"
                    if self.on_lost is not None:
                        self.on_lost(self.lost)
                    return
            time.sleep(WATCH_S)

    def cause(self) -> str | None:
        """The first worker's own fatal error (not one that only follows another rank's), else any reported."""
        reports = []
        for path in sorted(self.run_dir.glob("rank*.json")):
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        reports.sort(key=lambda r: (bool(r.get("secondary")), int(r.get("rank", 0))))
        return f"rank {reports[0]['rank']}: {reports[0]['message']}" if reports else None

    def expect_exit(self) -> None:
        """Rank 0 is about to tell the workers to stop: their exits are no loss (no watcher reports them)."""
        self.stopping.set()
        if getattr(self, "comm", None) is not None:
            self.comm.stop_watch()

    def stop(self, grace: float = FOLLOW_GRACE_S) -> None:
        """After rank 0 told the workers to stop (or failed): wait for them, then end those still running."""
        self.expect_exit()
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

"""`--tp N` on one machine: start the N rank processes, watch them, and end them all when one fails.

No MPI launcher is involved. Open MPI 5's `prterun` always listens on every interface (its out-of-band TCP
listener binds INADDR_ANY and in6addr_any, and drops loopback whenever another interface exists: PRRTE v3.0.x
`src/mca/oob/tcp/oob_tcp_listener.c` `create_listen`, `oob_tcp_component.c` `component_available`), which no
MCA parameter changes. These ranks listen only on loopback (or on `--comm-interface`): the rendezvous store on a
socket bound here, the gloo/NCCL data sockets on the interface (see launch.py).

Supervision: every rank dies with the launcher (parent-death signal), a rank that fails makes the launcher end
the others within seconds, and the launcher prints the failure's root cause as one line and exits with the
failed rank's status. Runs across machines use the user's own `mpirun` instead (launch.py joins it).
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
import time
from pathlib import Path

from trtllm_bdlora.distributed.launch import (
    LAUNCHER_ENV,
    LOOPBACK_INTERFACE,
    RANK_CPP_LOG_LEVEL,
    RANK_ENV,
    RUN_DIR_ENV,
    SPAWNED_ENV,
    STARTED_ENV,
    STORE_ENV,
    STORE_FD_ENV,
    WORLD_ENV,
    command_started,
    default_threads_per_rank,
    interface_address,
)
from trtllm_bdlora.logs import log_event, startup

TEARDOWN_GRACE_S = 3.0  # after a failure: how long the other ranks may take to exit on SIGTERM before SIGKILL
FOLLOW_GRACE_S = 10.0  # after rank 0 finished cleanly: how long the workers may take to follow
# glibc's arenas per rank process (default 8 per core), unless the environment sets MALLOC_ARENA_MAX: each thread that
# receives and converts request adapters frees into an arena of its own, where fragments stay; rank 0 of `serve --tp
# 2` settled about 30 MB lower with 2 (docs/testing.md, the memory checks). Set at the start: arenas cannot be merged.
RANK_MALLOC_ARENAS = 2


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _is_stopped(pid: int) -> bool:
    """The process is stopped by a signal (SIGSTOP, SIGTSTP) or traced (state T or t in /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class _Ranks:
    def __init__(self, procs: list[subprocess.Popen], run_dir: Path, graceful_signal: int | None):
        self.procs, self.run_dir, self.graceful_signal = procs, run_dir, graceful_signal
        self.exit: dict[int, int] = {}  # rank -> returncode (negative: killed by that signal)
        self.signalled: set[int] = set()  # ranks this launcher signalled (their deaths are no failure of theirs)
        self.stop_signal: int | None = None
        self.deadline: float | None = None

    def _send(self, ranks, signum: int) -> None:
        for r in ranks:
            if r not in self.exit and self.procs[r].poll() is None:
                self.signalled.add(r)
                self.procs[r].send_signal(signum)

    def on_signal(self, signum: int, _frame) -> None:
        """First SIGINT/SIGTERM: stop (serve: rank 0 drains and stops the workers itself); second: kill."""
        if self.stop_signal is not None:
            self._send(range(len(self.procs)), signal.SIGKILL)
            return
        self.stop_signal = signum
        if self.graceful_signal is not None:
            self._send([0], self.graceful_signal)
        else:
            self._send(range(len(self.procs)), signal.SIGTERM)

    def _teardown(self, grace: float) -> None:
        if self.deadline is None:
            stopped = [r for r, p in enumerate(self.procs) if _is_stopped(p.pid)]
            self._send(stopped, signal.SIGKILL)  # a stopped (SIGSTOP) rank cannot act on SIGTERM
            self._send(range(len(self.procs)), signal.SIGTERM)
            self.deadline = time.monotonic() + grace

    def supervise(self) -> None:
        while len(self.exit) < len(self.procs):
            for r, p in enumerate(self.procs):
                if r in self.exit or p.poll() is None:
                    continue
                self.exit[r] = p.returncode
                if p.returncode != 0 and r not in self.signalled:
                    self._teardown(TEARDOWN_GRACE_S)
                elif r == 0 and p.returncode == 0 and self.deadline is None:
                    self.deadline = time.monotonic() + FOLLOW_GRACE_S
            if self.deadline is not None and time.monotonic() > self.deadline:
                self._send(range(len(self.procs)), signal.SIGKILL)
            time.sleep(0.05)

    def _reports(self) -> dict[int, dict]:
        reports = {}
        for path in self.run_dir.glob("rank*.json"):
            try:
                report = json.loads(path.read_text())
                reports[int(report["rank"])] = report
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return reports

    def outcome(self) -> tuple[int, str | None]:
        """(exit status, one-line root cause or None). The cause, in order of precedence: a rank killed by a signal
        nobody here sent; the lowest rank's own error; a rank's bare non-zero exit; a rank's report that it lost
        the others (a consequence)."""
        failed = {r: rc for r, rc in self.exit.items() if rc != 0 and r not in self.signalled}
        reports = self._reports()
        if not failed and not reports:
            if self.stop_signal is not None and any(rc != 0 for rc in self.exit.values()):
                return 128 + self.stop_signal, None
            return 0, None

        def status(r: int) -> int:
            rc = self.exit.get(r, 1)
            return 128 - rc if rc < 0 else (rc or 1)

        def prefix(r: int) -> str:
            return "" if r == 0 else f"rank {r}: "

        for r, rc in sorted(failed.items()):
            if rc < 0:
                return status(r), f"rank {r} (pid {self.procs[r].pid}) was killed by signal {-rc} ({_signal_name(-rc)})"
        primary = sorted(r for r, rep in reports.items() if not rep.get("secondary"))
        if primary:
            return status(primary[0]), prefix(primary[0]) + str(reports[primary[0]]["message"])
        bare = sorted(r for r in failed if r not in reports)
        if bare:
            return status(bare[0]), f"rank {bare[0]} exited with status {failed[bare[0]]}"
        r = min(reports)
        return status(r), prefix(r) + str(reports[r]["message"])


def relaunch_ranks(n: int, argv: list[str], interface: str | None = None, graceful_signal: int | None = None,
                   module: str = "trtllm_bdlora") -> int:
    """Run `python -m MODULE argv` (`trtllm-bdlora argv`) as n ranks on this machine and supervise them; returns
    the exit status. With `graceful_signal`, SIGINT/SIGTERM reach rank 0 as that signal (it stops the workers
    itself)."""
    command = argv[0] if argv else "trtllm-bdlora"
    addr = interface_address(interface)
    log_event(startup, "starting ranks", tp=n, interface=interface or LOOPBACK_INTERFACE, address=addr)
    run_dir = Path(tempfile.mkdtemp(prefix="trtllm-bdlora-ranks-"))
    listener = socket.create_server((addr, 0))
    env = dict(os.environ)
    env.update({WORLD_ENV: str(n), STORE_ENV: f"{addr}:{listener.getsockname()[1]}", RUN_DIR_ENV: str(run_dir),
                LAUNCHER_ENV: str(os.getpid()), STARTED_ENV: str(command_started()), SPAWNED_ENV: str(time.time())})
    env.setdefault("OMP_NUM_THREADS", str(default_threads_per_rank(n)))
    env.setdefault("MALLOC_ARENA_MAX", str(RANK_MALLOC_ARENAS))
    env.setdefault(*RANK_CPP_LOG_LEVEL)
    procs: list[subprocess.Popen] = []
    previous = {}
    try:
        for r in range(n):
            rank_env = dict(env, **{RANK_ENV: str(r)})
            fds: tuple[int, ...] = ()
            if r == 0:
                rank_env[STORE_FD_ENV] = str(listener.fileno())
                fds = (listener.fileno(),)
            # own sessions: a Ctrl-C at the terminal reaches the launcher, which decides what the ranks get
            procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=rank_env,
                                          stdin=subprocess.DEVNULL, pass_fds=fds, start_new_session=True))
        listener.close()
        ranks = _Ranks(procs, run_dir, graceful_signal)
        previous = {sig: signal.signal(sig, ranks.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        ranks.supervise()
        status, cause = ranks.outcome()
        if cause:
            print(f"trtllm-bdlora {command}: error: {cause}", file=sys.stderr, flush=True)
        return status
    finally:
        listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(run_dir, ignore_errors=True)

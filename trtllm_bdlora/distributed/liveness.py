"""Rank liveness: every rank of a multi-rank launch proves it is running, and a rank that stops is found in seconds.

Each rank publishes a heartbeat, `bdlora/hb/<rank>` = {"seq", "pid", "host"}, into the rendezvous store rank 0
hosts (torch.distributed's TCPStore, the one the process group was built on: it works across hosts under a
user's `mpirun` as under this package's launcher). Rank 0 watches every other rank; every other rank watches
rank 0. A watched rank whose heartbeat has not changed for `timeout` seconds (`--rank-timeout`) is lost:
`on_lost(RankLost)` runs once, on the watch's own thread. Watching starts at the rendezvous, before the process
group forms, and covers a rank from its first heartbeat on (a rank that never arrives is the rendezvous's
business: the collective timeout).

Why a heartbeat thread and not a shorter collective timeout: a rank blocked in a collective cannot tell a slow
peer from a stopped or hung one, and one step on a loaded CPU may take many seconds; but every thread of a
stopped (SIGSTOP) or frozen process stops, its heartbeat with it. The collective timeout (launch.py) stays as
the last resort.

Each rank runs two daemon threads. The exchange thread writes this rank's heartbeat and reads the watched ones
(store calls may block: on a worker, while rank 0, the store's host, is stopped); the judge thread never touches
the store, only compares times, so it decides on time whatever the store does. Ages are measured on this
rank's monotonic clock from when a heartbeat was seen to change, never from timestamps written by another host.
A judge that was itself stopped or starved (a gap between its ticks) forgives every watched rank that long.

Bound (interval = min(1 s, timeout / 10)): a watched rank stopped for `timeout + 2 * interval` seconds is always
found lost, within that time; one that resumes within `timeout - 2 * interval` seconds never is (it loses
nothing). Default `--rank-timeout 10`: found within 12 s; a stop shorter than 8 s is never taken for a loss.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

KEY_PREFIX = "bdlora/hb/"
MAX_INTERVAL_S = 1.0


def heartbeat_key(rank: int) -> str:
    return f"{KEY_PREFIX}{rank}"


def heartbeat_interval(timeout: float) -> float:
    return min(MAX_INTERVAL_S, timeout / 10)


@dataclass(frozen=True)
class RankLost:
    """A watched rank whose heartbeat stopped. `unreachable`: the store itself failed (its host, rank 0, exited:
    a consequence the launcher reports better), rather than answering with an unchanged heartbeat. `watcher_host`:
    the host of the rank that found it; on another host, the lost host is named first (as hosts.describe_loss)."""

    rank: int
    pid: int | None
    host: str | None
    silent_s: float
    timeout: float
    unreachable: bool = False
    watcher_host: str | None = None

    @property
    def other_host(self) -> bool:
        return None not in (self.host, self.watcher_host) and self.host != self.watcher_host

    def __str__(self) -> str:
        """For the log and the exit line: names the rank's PID and host."""
        if self.other_host:
            return f"lost host {self.host} (rank {self.rank}): " + self._line(f"rank {self.rank} (pid {self.pid})")
        return self._line(f"rank {self.rank}" + (f" (pid {self.pid} on {self.host})" if self.pid is not None else ""))

    @property
    def summary(self) -> str:
        """For clients: the rank (and, across hosts, the host lost), not its PID."""
        return (f"lost host {self.host} (rank {self.rank}): " if self.other_host else "") + self._line(f"rank {self.rank}")

    def _line(self, who: str) -> str:
        what = "is unreachable" if self.unreachable else "stopped responding"
        return f"{who} {what}: no heartbeat for {self.silent_s:.1f} s (--rank-timeout {self.timeout:g})"


def _default_on_lost(lost: RankLost) -> None:
    os._exit(1)


class RankWatch:
    """This rank's heartbeat and its watch over the others (rank 0: every rank; others: rank 0).

    `store` is a client of the rendezvous store for this object alone (TCPStore.clone()): its calls may block.
    `on_lost` may be replaced after `start` (e.g. by serve's runtime); it runs at most once."""

    def __init__(self, store, rank: int, world: int, timeout: float,
                 on_lost: Callable[[RankLost], None] = _default_on_lost, clock: Callable[[], float] = time.monotonic):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.on_lost = on_lost
        self.clock = clock
        self.interval = heartbeat_interval(timeout)
        self.watched = list(range(1, world)) if rank == 0 else [0]
        self.identity = {"pid": os.getpid(), "host": socket.gethostname()}
        self._seq = 0
        self._last: dict[int, bytes] = {}  # watched rank -> last heartbeat value seen
        self._seen: dict[int, float] = {}  # watched rank -> when its heartbeat was last seen to change
        self._who: dict[int, dict] = {}  # watched rank -> its pid and host, from its heartbeat
        self._unreachable = False
        self._stop = threading.Event()
        self._lost: RankLost | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def lost(self) -> RankLost | None:
        return self._lost

    def publish(self) -> None:
        """Write this rank's heartbeat once (before the process group forms, so every key exists afterwards)."""
        self._seq += 1
        self.store.set(heartbeat_key(self.rank), json.dumps({"seq": self._seq, **self.identity}))

    def start(self) -> RankWatch:
        for target, name in ((self._exchange_loop, "bdlora-heartbeat"), (self._judge_loop, "bdlora-rank-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop publishing and judging (a clean end of the run: the other ranks are leaving too)."""
        self._stop.set()

    # exchange thread ---------------------------------------------------------
    def _exchange_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish()
                self.observe(self._read())
                self._unreachable = False
            except Exception:  # noqa: BLE001 - a store that fails is no news; the judge decides on time
                self._unreachable = True
            self._stop.wait(self.interval)

    def _read(self) -> dict[int, bytes]:
        present = [r for r in self.watched if self.store.check([heartbeat_key(r)])]
        if not present:
            return {}
        values = self.store.multi_get([heartbeat_key(r) for r in present])
        return dict(zip(present, values))

    def observe(self, values: dict[int, bytes]) -> None:
        """Heartbeat values just read: a changed one counts as a sign of life now."""
        now = self.clock()
        with self._lock:
            for r, value in values.items():
                if value != self._last.get(r):
                    self._last[r] = value
                    self._seen[r] = now
                    try:
                        self._who[r] = json.loads(value)
                    except (ValueError, TypeError):
                        pass

    # judge thread ------------------------------------------------------------
    def _judge_loop(self) -> None:
        last_tick = self.clock()
        while not self._stop.wait(self.interval):
            now = self.clock()
            stalled = now - last_tick - self.interval
            last_tick = now
            lost = self.judge(now, stalled)
            if lost is not None:
                self._declare(lost)
                return

    def judge(self, now: float, stalled: float = 0.0) -> RankLost | None:
        """The first watched rank silent for more than `timeout` at `now`, or None. `stalled`: how much later than
        planned this tick came (this process itself was stopped or starved): forgiven to every watched rank."""
        with self._lock:
            if stalled > self.interval:
                for r in self._seen:
                    self._seen[r] += stalled
            for r in self.watched:
                if r not in self._seen:  # not started yet: the rendezvous waits for it (the collective timeout)
                    continue
                silent = now - self._seen[r]
                if silent > self.timeout:
                    who = self._who.get(r, {})
                    return RankLost(r, who.get("pid"), who.get("host"), silent, self.timeout, self._unreachable,
                                    self.identity["host"])
        return None

    def _declare(self, lost: RankLost) -> None:
        with self._lock:
            if self._lost is not None or self._stop.is_set():
                return
            self._lost = lost
        self.on_lost(lost)

"""Rank liveness (distributed/liveness.py) against real processes and a real TCPStore: a rank stopped with SIGSTOP is
found lost within the documented bound, named with its PID; one resumed before the bound is not; a worker finds a
stopped rank 0 although its store calls block (rank 0 hosts the store). The judge's arithmetic on a fake clock."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from tests.helpers import REPO
from trtllm_bdlora.distributed.liveness import RankWatch, heartbeat_interval

TIMEOUT = 2.0
INTERVAL = heartbeat_interval(TIMEOUT)
SLACK = 1.5  # scheduling on a loaded 2-core machine

# a rank in a child process: its own RankWatch on the store at argv (rank 0 hosts it, on a port it prints)
CHILD = """
import json, sys, time
from datetime import timedelta
import torch.distributed as dist
from trtllm_bdlora.distributed.liveness import RankWatch
rank, port, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30), wait_for_workers=False)
print(json.dumps({"port": store.port}), flush=True)
lost = []
watch = RankWatch(store.clone(), rank, 2, timeout, on_lost=lost.append)
watch.publish()
watch.start()
time.sleep(3600)
"""


class Rank:
    def __init__(self, rank: int, port: int):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(rank), str(port), str(TIMEOUT)],
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.port = json.loads(self.proc.stdout.readline())["port"]

    def close(self):
        self.proc.kill()
        self.proc.wait()


class Recorder:
    def __init__(self):
        self.lost, self.at = None, None
        self.event = threading.Event()

    def __call__(self, lost):
        self.lost, self.at = lost, time.monotonic()
        self.event.set()


@pytest.fixture
def rank0_here():
    """This process as rank 0 (hosting the store, watching rank 1) and rank 1 in a child process."""
    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timedelta(seconds=30), wait_for_workers=False)
    recorder = Recorder()
    watch = RankWatch(store.clone(), 0, 2, TIMEOUT, on_lost=recorder)
    watch.publish()
    child = Rank(1, store.port)
    while not store.check(["bdlora/hb/1"]):
        time.sleep(0.1)
    watch.start()
    yield child, watch, recorder
    watch.stop()
    child.close()


def test_a_stopped_rank_is_lost_within_the_bound_and_named(rank0_here):
    child, watch, recorder = rank0_here
    time.sleep(2 * INTERVAL)
    assert watch.lost is None
    os.kill(child.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    assert recorder.event.wait(TIMEOUT + 2 * INTERVAL + SLACK), "the stopped rank was not found lost"
    found = recorder.at - stopped
    print(f"LIVENESS stopped rank found after {found:.2f} s (timeout {TIMEOUT} s, interval {INTERVAL} s)")
    assert TIMEOUT - 2 * INTERVAL <= found <= TIMEOUT + 2 * INTERVAL + SLACK
    lost = recorder.lost
    assert (lost.rank, lost.pid, lost.unreachable) == (1, child.proc.pid, False)
    assert str(lost).startswith(f"rank 1 (pid {child.proc.pid} on ") and "stopped responding" in str(lost)
    os.kill(child.proc.pid, signal.SIGCONT)


def test_a_rank_resumed_before_the_bound_is_not_lost(rank0_here):
    child, watch, recorder = rank0_here
    time.sleep(2 * INTERVAL)
    for _ in range(2):
        os.kill(child.proc.pid, signal.SIGSTOP)
        time.sleep(TIMEOUT - 4 * INTERVAL)  # within the guarantee (timeout - 2 intervals), with a margin
        os.kill(child.proc.pid, signal.SIGCONT)
        time.sleep(3 * INTERVAL)
    assert not recorder.event.wait(TIMEOUT), f"lost although it resumed in time: {recorder.lost}"


def test_a_worker_finds_a_stopped_rank_0_although_the_store_blocks():
    child = Rank(0, 0)  # rank 0 in the child: it hosts the store, so this process's store calls block once stopped
    recorder = Recorder()
    store = dist.TCPStore("127.0.0.1", child.port, 2, False, timeout=timedelta(seconds=30))
    watch = RankWatch(store.clone(), 1, 2, TIMEOUT, on_lost=recorder)
    try:
        watch.publish()
        watch.start()
        time.sleep(3 * INTERVAL)
        os.kill(child.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert recorder.event.wait(TIMEOUT + 2 * INTERVAL + SLACK), "rank 0 stopped but was not found lost"
        assert recorder.at - stopped <= TIMEOUT + 2 * INTERVAL + SLACK
        assert (recorder.lost.rank, recorder.lost.pid) == (0, child.proc.pid)
    finally:
        watch.stop()
        os.kill(child.proc.pid, signal.SIGCONT)
        child.close()


class FakeStore:
    def set(self, key, value):
        pass


def test_judge_forgives_its_own_stall_and_names_the_first_silent_rank():
    now = [100.0]
    watch = RankWatch(FakeStore(), 0, 3, 10.0, clock=lambda: now[0])
    watch.identity["host"] = "a"  # the watched ranks run on this host
    with watch._lock:
        watch._seen = {1: 100.0, 2: 100.0}
    watch.observe({1: json.dumps({"seq": 1, "pid": 11, "host": "a"}).encode()})
    now[0] = 109.0
    assert watch.judge(now[0]) is None
    now[0] = 125.0  # this process was stopped for 15 s: nobody is to blame for that
    assert watch.judge(now[0], stalled=15.0) is None
    now[0] = 120.5
    watch.observe({1: json.dumps({"seq": 2, "pid": 11, "host": "a"}).encode()})
    lost = watch.judge(126.0)
    assert lost is not None and lost.rank == 2 and lost.pid is None and lost.silent_s == pytest.approx(11.0)
    now[0] = 126.0
    watch.observe({2: b"{}"})  # rank 2 alive again (a value that is no JSON object names nobody)
    assert watch.judge(130.0) is None
    lost = watch.judge(130.6)
    assert (lost.rank, lost.pid, lost.host) == (1, 11, "a") and str(lost).startswith("rank 1 (pid 11 on a) stopped")


def test_a_rank_on_another_host_is_reported_as_that_host_lost():
    """Across hosts the lost host comes first, in hosts.describe_loss's words; clients get no PID."""
    from trtllm_bdlora.distributed.liveness import RankLost

    lost = RankLost(1, 4242, "h2", 10.24, 10.0, watcher_host="h1")
    assert str(lost) == "lost host h2 (rank 1): rank 1 (pid 4242) stopped responding: no heartbeat for 10.2 s " \
                        "(--rank-timeout 10)"
    assert lost.summary == "lost host h2 (rank 1): rank 1 stopped responding: no heartbeat for 10.2 s (--rank-timeout 10)"
    here = RankLost(1, 4242, "h1", 10.24, 10.0, watcher_host="h1")
    assert str(here).startswith("rank 1 (pid 4242 on h1) stopped") and here.summary.startswith("rank 1 stopped")

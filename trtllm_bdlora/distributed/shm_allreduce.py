"""All-reduce (and all-gather) through shared memory, for the ranks of one machine on CPU.

gloo all-reduces over loopback TCP in a ring: 2 (world - 1) messages, each a wake-up of another process. When the
ranks outnumber the cores (TP 3 on two cores) every wake-up waits for a time slice, and the 60 all-reduces of a
smollm2 decode step cost more than its compute: 3.5 ms per all-reduce of 8 x 576 floats with a GEMM between them,
against 0.9 ms here (3 ranks on 2 cores, 2026-12-06). Here every rank writes its tensor into its own row of a
shared segment, raises its sequence number, waits until every rank has raised it, and sums the rows in rank order:
one round, the same bits on every rank. Rows alternate between two halves, so a rank may write the next
all-reduce while a slower one still reads this one (it cannot run two ahead: that needs every rank's next number).

A waiting rank yields its core (it does not spin: the rank it waits for may need that core), then sleeps in short
naps; every ~20 ms it checks that the ranks it waits for still run (a rank that died is seen at once, as gloo sees
its closed connections), that the rank watch has not declared one lost, and the collective timeout. x86-64 only
(its stores are seen in program order, which the sequence numbers rely on); elsewhere, across hosts and on CUDA
the collectives stay gloo's / NCCL's. `TRTLLM_BDLORA_SHM_ALLREDUCE=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import platform
import secrets
import time
from pathlib import Path

import torch

ENV = "TRTLLM_BDLORA_SHM_ALLREDUCE"
SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 1 << 20  # per rank and half: larger tensors go in several rounds
FLAG_STRIDE = 16  # int64s between two ranks' sequence numbers: one cache line each, and then some
YIELD_S = 0.001  # waiting this long, a rank naps instead of only yielding
NAP_S = 50e-6
CHECK_S = 0.02  # how often a waiting rank checks the others are alive

log = logging.getLogger("trtllm_bdlora.launch")


def eligible(comm) -> bool:
    return (comm.world > 1 and comm.device.type == "cpu" and not comm.multi_host
            and platform.machine().lower() in ("x86_64", "amd64") and os.environ.get(ENV, "1") != "0"
            and SHM_DIR.is_dir())


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # not ours to read: taken as running
        return "R"
    return stat[stat.rindex(")") + 2]


class SharedMemoryAllReduce:
    def __init__(self, path: Path, rank: int, world: int, pids: list[int], watch=None, timeout_s: float = 600.0):
        self.rank, self.world, self.pids, self.watch, self.timeout_s = rank, world, pids, watch, timeout_s
        header = world * FLAG_STRIDE * 8
        raw = torch.from_file(str(path), shared=True, size=header + 2 * world * SLOT_BYTES, dtype=torch.uint8)
        self.flags = raw[:header].view(torch.int64).numpy().reshape(world, FLAG_STRIDE)
        self.rows = raw[header:].view(2, world, SLOT_BYTES)
        self.seq = 0  # this rank's last sequence number (the segment is fresh: all zero)

    @classmethod
    def create(cls, comm, timeout_s: float) -> SharedMemoryAllReduce | None:
        """Every rank of `comm` calls this together; all get a segment or all get None (and keep gloo's)."""
        import torch.distributed as dist

        pids = [torch.zeros(1, dtype=torch.int64) for _ in range(comm.world)]
        dist.all_gather(pids, torch.tensor([os.getpid()]))
        path = None
        if comm.rank == 0:
            path = SHM_DIR / f"trtllm-bdlora-allreduce-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.posix_fallocate(fd, 0, comm.world * FLAG_STRIDE * 8 + 2 * comm.world * SLOT_BYTES)
                finally:
                    os.close(fd)
            except OSError as err:  # no room in /dev/shm (a container's 64 MB): gloo, said once
                log.warning("all-reduce over gloo: no shared-memory segment in %s (%s)", SHM_DIR, err.strerror)
                path.unlink(missing_ok=True)
                path = None
        path = comm.broadcast_json(None if path is None else str(path))
        shm = None
        hidden = [int(p) for p in pids if _state(int(p)) in (None, "Z", "X")]
        if hidden:  # another PID namespace: a peer's end could not be seen while waiting for it
            log.warning("rank %d: all-reduce over gloo: PIDs %s of other ranks are not visible here", comm.rank, hidden)
        elif path is not None:
            try:
                shm = cls(Path(path), comm.rank, comm.world, [int(p) for p in pids], comm.watch, timeout_s)
            except (OSError, RuntimeError) as err:
                log.warning("rank %d: all-reduce over gloo: cannot map %s (%s)", comm.rank, path, err)
        ok = torch.tensor([int(shm is not None)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if comm.rank == 0 and path is not None:
            Path(path).unlink(missing_ok=True)  # every rank has it mapped (or gave up): nothing is left behind
        return shm if int(ok) else None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `t` (same shape and dtype everywhere), written into `t`."""
        flat = t.reshape(-1)  # a view where the strides allow, else a copy (written back below)
        for part, rows in self._rounds(flat):
            if t.dtype == torch.float32:
                torch.sum(rows, 0, out=part)
            else:
                part.copy_(rows.sum(0, dtype=torch.float32))
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view_as(t))
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (same shape and dtype everywhere) concatenated along the last dimension, in rank order."""
        flat = t.reshape(-1)
        out = t.new_empty(self.world, flat.numel())
        start = 0
        for part, rows in self._rounds(flat):
            out[:, start : start + part.numel()].copy_(rows)
            start += part.numel()
        return out.view(self.world, *t.shape).movedim(0, -2).reshape(*t.shape[:-1], self.world * t.shape[-1])

    def _rounds(self, flat: torch.Tensor):
        """(part, rows) per round: this rank's next part of `flat`, and every rank's part of this round as rows
        [world, len(part)] of the segment, readable until this rank's next round."""
        per_round = SLOT_BYTES // flat.element_size()
        for start in range(0, flat.numel(), per_round):
            part = flat[start : start + per_round]
            self.seq += 1
            half = self.seq % 2
            nbytes = part.numel() * part.element_size()
            self.rows[half, self.rank, :nbytes].view(flat.dtype).copy_(part)
            self.flags[self.rank, 0] = self.seq
            self._wait(self.seq)
            yield part, self.rows[half, :, :nbytes].view(flat.dtype)

    def _wait(self, seq: int) -> None:
        flags = self.flags[:, 0]
        start = time.monotonic()
        next_check = start + CHECK_S
        while flags.min() < seq:
            now = time.monotonic()
            if now - start < YIELD_S:
                os.sched_yield()
            else:
                time.sleep(NAP_S)
            if now >= next_check:
                next_check = now + CHECK_S
                self._check(seq, now - start)

    def _check(self, seq: int, waited: float) -> None:
        """Raise (RuntimeError, as gloo would) when a rank this all-reduce waits for cannot come."""
        for rank, pid in enumerate(self.pids):
            if self.flags[rank, 0] < seq and _state(pid) in (None, "Z", "X"):
                raise RuntimeError(f"rank {rank} (PID {pid}) exited during an all-reduce")
        lost = self.watch.lost if self.watch is not None else None
        if lost is not None:
            raise RuntimeError(str(lost))
        if waited > self.timeout_s:
            late = [r for r in range(self.world) if self.flags[r, 0] < seq]
            raise RuntimeError(f"all-reduce timed out after {self.timeout_s:.0f} s waiting for rank(s) {late}")

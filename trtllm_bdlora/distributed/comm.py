"""Collectives over torch.distributed (gloo on CPU, NCCL on CUDA), with per-step accounting.

Every collective is recorded as (kind, bytes, category) where category is "base" or "lora",
so `generate --stats` can show that BD-LoRA adds no LoRA collectives. A collective that fails because
another rank died (or timed out) raises RankLostError, so a rank can tell that consequence from a cause.

A collective waits for the other ranks up to launch.COLLECTIVE_TIMEOUT_S, on one machine as across hosts: the
last resort only. A rank that stops, hangs or is cut off is found by the one liveness mechanism, the rank watch
(liveness.py: heartbeats through rank 0's store, `--rank-timeout`), which ends the run while the collectives
still wait; a rank that dies is seen at once, by the connections it closes (or, on one machine's CPU, where
all-reduces go through shared memory, `shm_allreduce.py`, by its process's end).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch


class RankLostError(RuntimeError):
    """A collective failed: another rank exited, crashed or stopped answering. `lost` names what was lost (a
    host and its ranks, or the rank the rank watch found silent) where that is known, in words a client may see;
    the message adds the transport's error. `silent`: the rank watch's finding (liveness.RankLost) when the
    collective gave up because of it (the shared-memory path does); `lost` is then its client line."""

    def __init__(self, message: str, lost: str | None = None, silent=None):
        super().__init__(message)
        self.lost = silent.summary if silent is not None and lost is None else lost
        self.silent = silent


def _collective(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.world == 1:
            return method(self, *args, **kwargs)
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as err:  # gloo / NCCL report a dead peer or a timeout as RuntimeError subclasses
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if self.multi_host:
                from trtllm_bdlora.distributed.hosts import describe_loss

                message = describe_loss(self, first.strip())
                lost = message.partition(":")[0] if " lost host " in message.partition(":")[0] else None
                raise RankLostError(message, lost) from err
            raise RankLostError(f"rank {self.rank} lost contact with the other ranks ({first.strip()})",
                                silent=self.watch.lost if self.watch is not None else None) from err

    return wrapper


@dataclass
class CollectiveLog:
    events: list[tuple[str, int, str]] = field(default_factory=list)

    def record(self, kind: str, tensor: torch.Tensor, category: str) -> None:
        self.events.append((kind, tensor.numel() * tensor.element_size(), category))

    def summary(self) -> dict:
        out: dict = {}
        for kind, nbytes, category in self.events:
            entry = out.setdefault(category, {}).setdefault(kind, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += nbytes
        return out

    def count(self, category: str) -> int:
        return sum(1 for _, _, c in self.events if c == category)

    def clear(self) -> None:
        self.events.clear()


class Comm:
    """Rank-local view of the TP group. With world == 1 every collective is the identity."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None, hosts: list[str] | None = None,
                 addrs: list[str] | None = None, store=None):
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.log = CollectiveLog()
        self.hosts = hosts or ["localhost"] * world  # each rank's hostname and interface address
        self.addrs = addrs or ["127.0.0.1"] * world
        self.store = store  # rank 0's rendezvous store (torch.distributed.Store), None at world 1
        self.watch = None  # this rank's liveness.RankWatch, in a multi-rank launch
        self.shm = None  # shm_allreduce.SharedMemoryAllReduce: the ranks share one machine's CPU

    @property
    def multi_host(self) -> bool:
        return len(set(self.hosts)) > 1

    def stop_watch(self) -> None:
        """The run ends cleanly: stop this rank's heartbeat and its watch over the others."""
        if self.watch is not None:
            self.watch.stop()

    @_collective
    def all_reduce(self, t: torch.Tensor, category: str = "base") -> torch.Tensor:
        if self.world > 1:
            self.log.record("all_reduce", t, category)
            if self.shm is not None:
                return self.shm.all_reduce(t)
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    @_collective
    def all_gather(self, t: torch.Tensor, category: str = "lora") -> torch.Tensor:
        """Concatenate every rank's `t` along the last dimension."""
        if self.world == 1:
            return t
        self.log.record("all_gather", t, category)
        if self.shm is not None:
            return self.shm.all_gather(t)
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    @_collective
    def broadcast_json(self, obj=None):
        """Rank 0's JSON-serialisable `obj` on every rank (JSON, never pickle)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        if self.rank == 0:
            payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(size, 0)
        buf = payload.to(self.device) if self.rank == 0 else torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, 0)
        return obj if self.rank == 0 else json.loads(bytes(buf.cpu().numpy()).decode())

    @_collective
    def broadcast_tensor(self, t: torch.Tensor | None, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Rank 0's tensor `t` (CPU) on every rank, as a CPU tensor."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        buf = (t.to(dtype) if self.rank == 0 else torch.empty(shape, dtype=dtype)).contiguous().to(self.device)
        dist.broadcast(buf, 0)
        return buf.cpu()

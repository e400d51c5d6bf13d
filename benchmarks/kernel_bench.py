"""Benchmark the BD-LoRA kernel at per-rank TP=8 shapes of Llama-3.1-8B / 70B.

On a CUDA GPU: median of many timed runs (CUDA events, warm-up, rotating input buffers) of
  bdlora      the Triton kernel at rank r/8 on the rank's shards
  torch_ref   the torch reference op (same work)
  replicated  the replicated scheme's per-rank work (full rank r)
  slora       S-LoRA's per-rank compute (collectives not included)
  base_gemm   the module's own per-rank GEMM
with achieved GB/s against the measured device copy bandwidth. Writes JSON and prints a table.
Without a GPU it runs tiny shapes under TRITON_INTERPRET=1 so CI keeps it alive (no timing claims).

  python benchmarks/kernel_bench.py --out docs/kernel_bench.json             # full sweep, GPU
  python benchmarks/kernel_bench.py --smoke                                   # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import date

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trtllm_bdlora.kernels.lora_ref import multi_lora_ref  # noqa: E402
from trtllm_bdlora.kernels.multi_lora import multi_lora  # noqa: E402

MODELS = {  # hidden, intermediate, heads, kv heads, head dim
    "llama-3.1-8b": (4096, 14336, 32, 8, 128),
    "llama-3.1-70b": (8192, 28672, 64, 8, 128),
}
TP = 8


def module_shapes(model: str, tp: int = TP) -> dict[str, tuple[int, int, str]]:
    """Per-rank (K, M, role) of the seven modules."""
    h, i, nh, nkv, hd = MODELS[model]
    q, kv = nh * hd // tp, max(1, nkv // tp) * hd
    return {"q_proj": (h, q, "column"), "k_proj": (h, kv, "column"), "v_proj": (h, kv, "column"),
            "o_proj": (nh * hd // tp, h, "row"), "gate_proj": (h, i // tp, "column"), "up_proj": (h, i // tp, "column"),
            "down_proj": (i // tp, h, "row")}


def scheme_work(scheme: str, K: int, M: int, role: str, r: int, tp: int) -> tuple[int, int, int]:
    """(K, M, rank) of one rank's LoRA work under a scheme."""
    if scheme == "bdlora":
        return K, M, r // tp
    if scheme == "replicated":
        return K, M, r
    # slora: column shrinks r/tp then expands the gathered r; row shrinks r then expands M/tp
    return (K, M, r) if role == "column" else (K, M // tp, r)


class Problem:
    def __init__(self, T, K, M, rank, adapters, dtype, device, copies):
        gen = torch.Generator(device="cpu").manual_seed(T * 7 + K + M + rank)

        def rnd(*shape):
            return (torch.randn(*shape, generator=gen) * 0.1).to(dtype).to(device)

        self.xs = [rnd(T, K) for _ in range(copies)]  # rotating buffers: no cache-warm repeats
        self.ys = [rnd(T, M) for _ in range(copies)]
        self.a = [rnd(adapters, rank, K)]
        self.b = [rnd(adapters, M, rank)]
        self.ranks = [torch.full((adapters,), rank, dtype=torch.int32, device=device)]
        self.scales = [torch.ones(adapters, device=device)]
        self.slot_ids = (torch.arange(T, device=device) % adapters).to(torch.int64)
        self.w = rnd(M, K)
        self.nbytes = (T * K + adapters * rank * (K + M) + 2 * T * M) * torch.finfo(dtype).bits // 8


def time_fn(fn, copies, iters, warmup, cuda):
    for i in range(warmup):
        fn(i % copies)
    if not cuda:
        import time

        ts = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i % copies)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    ts = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % copies)
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return statistics.median(ts)


def copy_bandwidth(device, cuda) -> float:
    n = (1 << 28) if cuda else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda _: dst.copy_(src), 1, 20 if cuda else 3, 3, cuda)
    return 2 * n / t / 1e9


def run(args) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth(device, cuda)
    rows = []
    for model in args.models:
        for name, (K, M, role) in module_shapes(model).items():
            if args.smoke:
                K, M = max(16, K // 128), max(16, M // 128)
            for T in args.tokens:
                for adapters in args.adapters:
                    for r in args.ranks:
                        row = {"model": model, "module": name, "T": T, "adapters": adapters, "r": r}
                        for scheme in ("bdlora", "replicated", "slora"):
                            k, m, rank = scheme_work(scheme, K, M, role, r, TP)
                            p = Problem(T, k, m, rank, adapters, dtype, device, args.copies)
                            t = time_fn(lambda i, p=p: multi_lora(p.ys[i], p.xs[i], p.slot_ids, p.a, p.b, p.ranks,
                                                                  p.scales, [0]), args.copies, args.iters, args.warmup, cuda)
                            row[f"{scheme}_us"] = t * 1e6
                            if scheme == "bdlora":
                                row["bdlora_gbs"] = p.nbytes / t / 1e9
                                row["bdlora_pct_copy_bw"] = 100 * row["bdlora_gbs"] / copy_gbs
                                tr = time_fn(lambda i, p=p: multi_lora_ref(p.ys[i], p.xs[i], p.slot_ids, p.a, p.b,
                                                                           p.ranks, p.scales, [0]),
                                             args.copies, max(3, args.iters // 10), 1, cuda)
                                row["torch_ref_us"] = tr * 1e6
                                tg = time_fn(lambda i, p=p: p.xs[i] @ p.w.T, args.copies, args.iters, args.warmup, cuda)
                                row["base_gemm_us"] = tg * 1e6
                                row["lora_over_base_pct"] = 100 * t / tg
                        rows.append(row)
    meta = {"date": str(date.today()), "device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)",
            "dtype": args.dtype, "copy_gbs": copy_gbs, "tp": TP, "smoke": args.smoke}
    return [meta] + rows


def print_table(result: list[dict]) -> None:
    meta, rows = result[0], result[1:]
    print(f"# {meta['device']}  {meta['date']}  {meta['dtype']}  copy {meta['copy_gbs']:.0f} GB/s  tp {meta['tp']}")
    cols = ["model", "module", "T", "adapters", "r", "bdlora_us", "torch_ref_us", "replicated_us", "slora_us",
            "base_gemm_us", "bdlora_gbs", "bdlora_pct_copy_bw", "lora_over_base_pct"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CPU)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--copies", type=int, default=4, help="rotating input buffers")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA GPU: running --smoke (tiny shapes, interpreter); no GPU figures are produced", file=sys.stderr)
        args.smoke = True
    if args.smoke:
        args.models, args.tokens, args.adapters, args.ranks = args.models[:1], [1, 16], [1, 2], [32]
        args.iters, args.warmup, args.copies = 2, 1, 2
    result = run(args)
    print_table(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

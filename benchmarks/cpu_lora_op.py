"""The CPU LoRA op's strategies against the torch reference at smollm2-135m's TP-1 shapes (one thread).

Per linear group (q|k|v, o, gate|up, down) of one layer: the base GEMM, kernels.lora_ref (a loop over adapters),
and kernels.lora_cpu with each strategy, at decode (T = 8) and prefill (T = 256) sizes (--tokens), 4 adapters of rank 16 in
8 slots sized for --max-lora-rank (64, the engine's default).
Medians of interleaved repetitions, in microseconds; the last line scales one layer to 30 layers.

  python benchmarks/cpu_lora_op.py [--reps 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtllm_bdlora.kernels import lora_cpu  # noqa: E402
from trtllm_bdlora.kernels.lora_ref import multi_lora_ref  # noqa: E402

GROUPS = {"qkv": (576, [576, 192, 192]), "o": (576, [576]), "gate_up": (576, [1536, 1536]), "down": (1536, [576])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-lora-rank", type=int, default=64, help="slot width, as the engine allocates it")
    p.add_argument("--tokens", default="8,256", help="comma-separated token counts per step")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"{'T':>5} {'group':<8}{'base':>9}{'reference':>11}{'dense':>9}{'grouped':>9}   (us, median of {args.reps})")
    for T in (int(t) for t in args.tokens.split(",")):
        slot_ids = torch.arange(T) % args.adapters
        totals = {k: 0.0 for k in ("base", "reference", "dense", "grouped")}
        for name, (K, Ms) in GROUPS.items():
            x, w = torch.randn(T, K, generator=gen), torch.randn(sum(Ms), K, generator=gen)
            cap = max(args.rank, args.max_lora_rank)
            a = [torch.randn(args.slots, cap, K, generator=gen) for _ in Ms]
            b = [torch.randn(args.slots, m, cap, generator=gen) for m in Ms]
            ranks = [torch.full((args.slots,), args.rank, dtype=torch.int32) for _ in Ms]
            scales = [torch.ones(args.slots) for _ in Ms]
            offs = [sum(Ms[:i]) for i in range(len(Ms))]
            y = x @ w.T

            def op(strategy, y=y, x=x, a=a, b=b, ranks=ranks, scales=scales, offs=offs, slot_ids=slot_ids):
                lora_cpu.STRATEGY = strategy
                return lora_cpu.multi_lora_cpu(y, x, slot_ids, a, b, ranks, scales, offs)

            fns = {"base": lambda x=x, w=w: x @ w.T,
                   "reference": lambda y=y, x=x, a=a, b=b, ranks=ranks, scales=scales, offs=offs, slot_ids=slot_ids:
                       multi_lora_ref(y, x, slot_ids, a, b, ranks, scales, offs),
                   "dense": lambda: op("dense"), "grouped": lambda: op("grouped")}
            samples = {k: [] for k in fns}
            for _ in range(args.reps):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
            for k in totals:
                totals[k] += med[k]
            print(f"{T:>5} {name:<8}" + "".join(f"{med[k]:>9.0f}  " if k == "reference" else f"{med[k]:>9.0f}"
                                             for k in fns))
        lora_cpu.STRATEGY = "auto"
        print(f"{T:>5} {'x30 ms':<8}" + "".join(f"{v * 30 / 1e3:>9.1f}" for v in totals.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine's float32 CPU kernels, torch's (oneDNN's prepacked linear, SDPA) against kernels/avx2.c, on
smollm2-135m's shapes: one pass over all 121 base weights of a decode step (30 layers of q|k|v, o, gate|up and
down, and the LM head: 538 MB, so they come from memory as in serving) at several row counts, and decode attention
over the KV caches of 30 layers.

  python benchmarks/cpu_kernels.py [--threads 1] [--rows 1,8,16,128] [--context 190] [--repeats 5]

Prints the best of --repeats for each, interleaved (torch, avx2, torch, ...), and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtllm_bdlora.engine.linear import Linear  # noqa: E402
from trtllm_bdlora.kernels import avx2  # noqa: E402

LAYER_SHAPES = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]  # qkv, o, gate_up, down
LAYERS, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 30, 49152, 9, 3, 64


def best(fns: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def linears(weights: list[torch.Tensor], choice: str) -> list[Linear]:
    """The engine's base linears of `weights` as they are built under TRTLLM_BDLORA_CPU_KERNELS=`choice`."""
    avx2.CHOICE = choice
    avx2._library.cache_clear()
    return [Linear(w) for w in weights]


def gemm_pass(rows: int, repeats: int) -> dict[str, float]:
    weights = [torch.randn(s) for s in LAYER_SHAPES * LAYERS + [(VOCAB, 576)]]
    built = {choice: linears(weights, choice) for choice in ("torch", "avx2")}
    xs = {k: torch.randn(rows, k) for k in (576, 1536)}
    return best({choice: lambda ls=ls: [linear(xs[linear.shape[1]]) for linear in ls] for choice, ls in built.items()},
                repeats)


def attention_pass(sequences: int, context: int, repeats: int) -> dict[str, float]:
    capacity = 1 << (context - 1).bit_length()
    caches = [[torch.randn(sequences, KV_HEADS, capacity, HEAD_DIM) for _ in range(2)] for _ in range(LAYERS)]
    q = torch.randn(sequences, HEADS + KV_HEADS, HEAD_DIM)[:, :HEADS]
    tokens = torch.arange(sequences)
    lengths = torch.full((sequences,), context)
    mask = (torch.arange(context)[None, :] < lengths[:, None]).view(sequences, 1, 1, context)
    out = torch.empty(sequences, HEADS * HEAD_DIM)
    grouped = q.reshape(sequences, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    return best({  # engine/attention.py's two paths, over every layer's cache
        "torch": lambda: [F.scaled_dot_product_attention(grouped, k[:, :, :context], v[:, :, :context], attn_mask=mask)
                          for k, v in caches],
        "avx2": lambda: [avx2.decode_attention(q, k, v, tokens, tokens, lengths, out) for k, v in caches],
    }, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,8,16,128")
    p.add_argument("--context", type=int, default=190)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    avx2.CHOICE = "avx2"
    if not avx2.usable(torch.empty(1)):
        print("the AVX2 kernels are not usable here (see the warning above)")
        return 1
    print(f"{args.threads} thread(s), {torch.backends.cpu.get_cpu_capability()}, best of {args.repeats}")
    for rows in map(int, args.rows.split(",")):
        t = gemm_pass(rows, args.repeats)
        print(f"base GEMMs of a step, {rows:4d} rows: torch {t['torch'] * 1e3:7.1f} ms  avx2 {t['avx2'] * 1e3:7.1f} ms"
              f"  {t['torch'] / t['avx2']:.2f}x")
    t = attention_pass(args.sequences, args.context, args.repeats)
    print(f"decode attention, {args.sequences} sequences of {args.context} tokens, per layer: torch "
          f"{t['torch'] / LAYERS * 1e6:.0f} us  avx2 {t['avx2'] / LAYERS * 1e6:.0f} us  {t['torch'] / t['avx2']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

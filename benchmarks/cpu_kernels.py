"""The engine's float32 CPU kernels, torch's (oneDNN's prepacked linear, SDPA, torch ops) against kernels/avx2.c,
on smollm2-135m's shapes: one pass over all 121 base weights of a decode step (30 layers of q|k|v, o, gate|up and
down, and the LM head: 538 MB, so they come from memory as in serving) at several row counts; the engine's
`step_attention` over the KV caches of 30 layers for a decode step and for one prompt's prefill; and a layer's
small ops (RoPE with the cache write, two residual adds with RMSNorm, SiLU-and-multiply) at decode size.

  python benchmarks/cpu_kernels.py [--threads 1] [--rows 1,8,16,128] [--context 190] [--prompt 160]
      [--prompt-after 0] [--repeats 5]

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
from trtllm_bdlora.engine.attention import step_attention, write_kv  # noqa: E402
from trtllm_bdlora.engine.kv_cache import KVBudget, KVCache  # noqa: E402
from trtllm_bdlora.engine.linear import Linear  # noqa: E402
from trtllm_bdlora.engine.llama import rms_norm, rotate_half  # noqa: E402
from trtllm_bdlora.engine.plan import SeqChunk  # noqa: E402
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


def choose(choice: str) -> None:
    avx2.CHOICE = choice
    avx2._library.cache_clear()


def linears(weights: list[torch.Tensor], choice: str) -> list[Linear]:
    """The engine's base linears of `weights` as they are built under TRTLLM_BDLORA_CPU_KERNELS=`choice`."""
    choose(choice)
    return [Linear(w) for w in weights]


def gemm_pass(rows: int, repeats: int) -> dict[str, float]:
    weights = [torch.randn(s) for s in LAYER_SHAPES * LAYERS + [(VOCAB, 576)]]
    built = {choice: linears(weights, choice) for choice in ("torch", "avx2")}
    xs = {k: torch.randn(rows, k) for k in (576, 1536)}
    return best({choice: lambda ls=ls: [linear(xs[linear.shape[1]]) for linear in ls] for choice, ls in built.items()},
                repeats)


def layout_after(earlier: list[SeqChunk], step: list[SeqChunk]):
    """A KV cache of random contents holding `earlier`, and the layout of the step `step` over it."""
    longest = max(c.start + len(c.tokens) for c in step)
    tokens = len({c.seq_id for c in earlier + step}) * (1 << (longest - 1).bit_length())
    cache = KVCache(LAYERS, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"), KVBudget(tokens, tokens))
    if earlier:
        cache.begin_step(earlier, HEADS // KV_HEADS)
    cache.storage.copy_(torch.randn(cache.storage.shape))
    return cache, cache.begin_step(step, HEADS // KV_HEADS)


def attention_pass(sequences: int, context: int, prompt: int, repeats: int, prompt_after: int = 0) -> dict[str, float]:
    """The engine's step_attention over 30 layers under each choice: a decode step of `sequences` sequences of
    `context` tokens, and the prefill of a `prompt`-token chunk of one prompt after its first `prompt_after`."""
    earlier = [SeqChunk(0, [1] * prompt_after, 0, -1)] if prompt_after else []
    cases = {
        "decode": (*layout_after([SeqChunk(i, [1] * (context - 1), 0, -1) for i in range(sequences)],
                                 [SeqChunk(i, [1], context - 1, -1) for i in range(sequences)]),
                   torch.randn(sequences, HEADS, HEAD_DIM)),
        "prefill": (*layout_after(earlier, [SeqChunk(0, [1] * prompt, prompt_after, -1)]),
                    torch.randn(prompt, HEADS, HEAD_DIM)),
    }
    times = {}
    for choice in ("torch", "avx2"):
        choose(choice)
        for name, (cache, step, q) in cases.items():
            run = lambda cache=cache, step=step, q=q: [step_attention(cache, i, step, q) for i in range(LAYERS)]  # noqa: E731
            times[f"{name} {choice}"] = best({0: run}, repeats)[0]
    return times


def small_ops_pass(rows: int, repeats: int) -> dict[str, float]:
    """A layer's ops besides the GEMMs and attention, at `rows` tokens: torch's (as engine/llama.py runs them in
    other dtypes or CPUs) against the fused calls."""
    hidden, inter, d = 576, 1536, HEAD_DIM
    cache = KVCache(1, KV_HEADS, d, torch.float32, torch.device("cpu"), KVBudget(4096, 4096))
    step = cache.begin_step([SeqChunk(i, [1], 0, -1) for i in range(rows)], HEADS // KV_HEADS)
    x, o, w = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.randn(hidden)
    qkv, gu = torch.randn(rows, (HEADS + 2 * KV_HEADS) * d), torch.randn(rows, 2 * inter)
    cos, sin = torch.randn(rows, d), torch.randn(rows, d)

    def torch_ops():
        h = rms_norm(x + o, w, 1e-5)
        qk = qkv[:, : (HEADS + KV_HEADS) * d].view(rows, HEADS + KV_HEADS, d)
        qk = qk * cos[:, None] + rotate_half(qk) * sin[:, None]
        write_kv(cache, 0, step, qk[:, HEADS:], qkv[:, (HEADS + KV_HEADS) * d :].view(rows, KV_HEADS, d))
        h = rms_norm(x + h, w, 1e-5)
        return F.silu(gu[:, :inter]) * gu[:, inter:]

    def fused_ops():
        y = x.clone()
        avx2.add_rms_norm(y, o, w, 1e-5)
        avx2.rope_store(qkv.clone(), HEADS, KV_HEADS, cos, sin, step.write_index, cache.view(0, 0), cache.view(0, 1))
        avx2.add_rms_norm(y, o, w, 1e-5)
        return avx2.silu_mul(gu)

    choose("avx2")
    return best({"torch": torch_ops, "avx2": fused_ops}, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,8,16,128")
    p.add_argument("--context", type=int, default=190)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--prompt", type=int, default=160)
    p.add_argument("--prompt-after", type=int, default=0, help="tokens of the prompt already in the cache")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    choose("avx2")
    if not avx2.usable(torch.empty(1)):
        print("the AVX2 kernels are not usable here (see the warning above)")
        return 1
    print(f"{args.threads} thread(s), {torch.backends.cpu.get_cpu_capability()}, best of {args.repeats}")
    for rows in map(int, args.rows.split(",")):
        t = gemm_pass(rows, args.repeats)
        print(f"base GEMMs of a step, {rows:4d} rows: torch {t['torch'] * 1e3:7.1f} ms  avx2 {t['avx2'] * 1e3:7.1f} ms"
              f"  {t['torch'] / t['avx2']:.2f}x")
    t = attention_pass(args.sequences, args.context, args.prompt, args.repeats, args.prompt_after)
    after = f" after {args.prompt_after}" if args.prompt_after else ""
    for name, what in (("decode", f"{args.sequences} sequences of {args.context} tokens"),
                       ("prefill", f"one prompt's {args.prompt} tokens{after}")):
        a, b = t[f"{name} torch"], t[f"{name} avx2"]
        print(f"step attention, {what}, per layer: torch {a / LAYERS * 1e6:.0f} us  avx2 {b / LAYERS * 1e6:.0f} us"
              f"  {a / b:.2f}x")
    choose("avx2")
    t = small_ops_pass(args.sequences, args.repeats * 20)
    print(f"a layer's small ops at {args.sequences} rows: torch {t['torch'] * 1e6:.0f} us  avx2 {t['avx2'] * 1e6:.0f} us"
          f"  {t['torch'] / t['avx2']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

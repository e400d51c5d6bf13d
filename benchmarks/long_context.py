"""Decode step time against the context: a batch of sequences prefilled to 256, 1k and 4k tokens (the prefill
timed too, in chunks of --chunk tokens), then timed decode steps (all the batch's sequences one token each), with
the attention's share timed separately.

One process, rank 0 of TP 1, smollm2-135m unless --model says otherwise. The contexts' decode steps run
interleaved, one step of each in turn, so that load from other processes falls on all alike.

  python benchmarks/long_context.py --contexts 256 1024 4096 --batch 4 --steps 10 --json docs/perf/long_context.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from attention_timer import time_attention  # noqa: E402


def main() -> int:
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import DTYPES, Engine
    from trtllm_bdlora.engine.kv_cache import kv_bytes_per_token, next_power_of_two
    from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
    from trtllm_bdlora.llama.loader import load_model_config

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # every context's sequences at once: rows of the capacity the longest needs (memory is taken only as written)
    shape = load_model_config(args.model)
    per_token = kv_bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim, DTYPES[args.dtype])
    rows = args.batch * len(args.contexts)
    budget = rows * next_power_of_two(max(args.contexts) + args.steps + 2) * per_token
    engine = Engine(Comm(0, 1, torch.device("cpu")), args.model, "bdlora", [], dtype=args.dtype, kv_cache_bytes=budget)
    attention = time_attention()
    gen = torch.Generator().manual_seed(0)
    seqs, prefill = {}, {}
    for k, context in enumerate(args.contexts):
        ids = [k * args.batch + i for i in range(args.batch)]
        prompts = [torch.randint(0, engine.shape.vocab_size, (context,), generator=gen).tolist() for _ in ids]
        attention["s"] = 0.0
        t0 = time.perf_counter()
        for start in range(0, context, args.chunk):
            engine.execute(StepPlan(chunks=[SeqChunk(s, p[start : start + args.chunk], start, -1) for s, p in zip(ids, prompts)]))
        prefill[context] = (time.perf_counter() - t0, attention["s"])
        print(f"context {context:>5}: prefill of {args.batch} x {context} tokens {prefill[context][0]:7.2f} s, "
              f"attention {prefill[context][1]:6.2f} s", flush=True)
        seqs[context] = ids
    samples: dict[int, list[tuple[float, float]]] = {c: [] for c in args.contexts}
    for step in range(args.steps + 1):  # the first round warms up
        order = args.contexts[step % len(args.contexts):] + args.contexts[: step % len(args.contexts)]
        for context in order:
            attention["s"] = 0.0
            t0 = time.perf_counter()
            engine.execute(StepPlan(chunks=[SeqChunk(s, [1], context + step, -1) for s in seqs[context]]))
            if step:
                samples[context].append((time.perf_counter() - t0, attention["s"]))
    rows = []
    for context in args.contexts:
        step_ms = statistics.median(s for s, _ in samples[context]) * 1e3
        attn_ms = statistics.median(a for _, a in samples[context]) * 1e3
        rows.append({"context": context, "step_ms": step_ms, "attention_ms": attn_ms,
                     "prefill_s": prefill[context][0], "prefill_attention_s": prefill[context][1],
                     "step_min_ms": min(s for s, _ in samples[context]) * 1e3,
                     "step_max_ms": max(s for s, _ in samples[context]) * 1e3})
    first = rows[0]
    for r in rows:
        extra = r["context"] - first["context"]
        r["attention_us_per_token"] = 1e3 * (r["attention_ms"] - first["attention_ms"]) / extra / args.batch if extra else None
        print(f"context {r['context']:>5}: step {r['step_ms']:7.1f} ms (min {r['step_min_ms']:.1f}, max "
              f"{r['step_max_ms']:.1f}), attention {r['attention_ms']:6.1f} ms", flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model, "batch": args.batch,
              "dtype": args.dtype, "threads": torch.get_num_threads(), "steps": args.steps, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

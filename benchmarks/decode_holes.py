"""Decode steps whose cache rows have holes (rows of kept prefixes or of sequences not decoding this step) against
steps whose rows are consecutive, on the torch attention path (SDPA: bfloat16, float16, or a CPU without AVX2).

16 sequences are prefilled to `--context` tokens (rows 0-15). Then, in turn: the 8 sequences of rows 0-7 decode
one token (`dense`), and the 8 of rows 0, 2, ..., 14 (`holes`: a row that does not decode between each two). The
attention (`TPLlama._attention`) is timed inside the step. TP 1, one process.

  TRTLLM_BDLORA_CPU_KERNELS=torch python benchmarks/decode_holes.py --context 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_timer import time_attention  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine
    from trtllm_bdlora.engine.plan import SeqChunk, StepPlan

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine(Comm(0, 1, torch.device("cpu")), args.model, "bdlora", [], dtype=args.dtype,
                    kv_cache_bytes=3 << 30)
    attention = time_attention()
    gen = torch.Generator().manual_seed(0)
    for seq in range(16):
        prompt = torch.randint(0, engine.shape.vocab_size, (args.context,), generator=gen).tolist()
        for start in range(0, args.context, 512):
            engine.execute(StepPlan(chunks=[SeqChunk(seq, prompt[start:start + 512], start, -1)]))
    position = dict.fromkeys(range(16), args.context)
    shapes = {"dense": list(range(8)), "holes": list(range(0, 16, 2))}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in shapes}
    for step in range(args.steps + 1):  # the first round warms up
        for name, seqs in shapes.items():
            attention["s"] = 0.0
            t0 = time.perf_counter()
            engine.execute(StepPlan(chunks=[SeqChunk(s, [1], position[s], -1) for s in seqs]))
            elapsed = time.perf_counter() - t0
            for s in seqs:
                position[s] += 1
            if step:
                samples[name].append((elapsed, attention["s"]))
    for name, rows in samples.items():
        print(f"{name}: step {statistics.median(s for s, _ in rows) * 1e3:.1f} ms, attention "
              f"{statistics.median(a for _, a in rows) * 1e3:.1f} ms (medians of {len(rows)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

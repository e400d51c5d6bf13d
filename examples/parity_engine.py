"""Held-out perplexity through the project's TP engine (the one `trtllm-bdlora generate` runs), for parity.py.

Run under `mpirun -n TP` (parity.py launches it): every rank loads the base once and builds one engine per scheme
with that scheme's adapters (BD-LoRA adapters through `bdlora`, plain LoRA through `replicated`); rank 0 plans
full-logit forwards of the held-out windows per adapter and writes {"SCHEME:ID" or "base": [nll sum, tokens]}.

  parity_engine.py --tp 3 --bdlora 1=DIR ... --replicated 1=DIR ... --windows windows.json --output nll.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtllm_bdlora.cli import parse_adapter_arg  # noqa: E402
from trtllm_bdlora.distributed.launch import init_ranks, shutdown  # noqa: E402
from trtllm_bdlora.engine.engine import Engine  # noqa: E402
from trtllm_bdlora.engine.plan import SeqChunk, StepPlan  # noqa: E402
from trtllm_bdlora.llama.loader import load_base_model  # noqa: E402

SCHEMES = ("bdlora", "replicated")


def window_nll(logits: torch.Tensor, windows: list[list[int]]) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of predicted tokens; `logits` is [sum of lengths, vocab]."""
    total, count, t0 = 0.0, 0, 0
    for ids in windows:
        n = len(ids)
        logp = torch.log_softmax(logits[t0 : t0 + n - 1].double(), dim=-1)
        total -= logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()
        count += n - 1
        t0 += n
    return total, count


def engine_nll(engine: Engine, adapter: int | None, windows: list[list[int]], batch: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        part = windows[i : i + batch]
        loads, slots = engine.pool.assign([adapter] * len(part))
        chunks = [SeqChunk(j, ids, 0, slot) for j, (ids, slot) in enumerate(zip(part, slots))]
        logits = engine.lead(StepPlan(loads=loads, chunks=chunks, all_logits=True))
        engine.lead(StepPlan(free=list(range(len(part)))))
        nll, n = window_nll(logits, part)
        total, count = total + nll, count + n
    return total, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, required=True)
    for scheme in SCHEMES:
        p.add_argument(f"--{scheme}", type=parse_adapter_arg, action="append", default=[], metavar="ID=DIR",
                       help=f"an adapter served with the {scheme} scheme")
    p.add_argument("--windows", required=True, help="JSON list of token-id windows")
    p.add_argument("--output", required=True)
    p.add_argument("--batch", type=int, default=8, help="windows per forward")
    args = p.parse_args(argv)
    comm = init_ranks(args.tp, "cpu")
    try:
        base = load_base_model("smollm2-135m")
        engines = {scheme: Engine(comm, base, scheme, [(a.task_id, a.directory) for a in getattr(args, scheme)], max_loras=1)
                   for scheme in SCHEMES}
        if comm.rank != 0:
            for engine in engines.values():
                engine.follow()
            return 0
        windows = json.loads(Path(args.windows).read_text())
        results = {"base": engine_nll(engines[SCHEMES[0]], None, windows, args.batch)}
        for scheme, engine in engines.items():
            for task_id in (a.task_id for a in getattr(args, scheme)):
                results[f"{scheme}:{task_id}"] = engine_nll(engine, task_id, windows, args.batch)
            engine.lead(None)
        Path(args.output).write_text(json.dumps(results))
        return 0
    finally:
        shutdown(comm)


if __name__ == "__main__":
    sys.exit(main())

"""Markdown tables for docs/performance.md from the measured JSON files in docs/perf/.

  python benchmarks/perf_tables.py bench docs/perf/bench_tp1_run1.json docs/perf/bench_tp3_run1.json ...
  python benchmarks/perf_tables.py validation docs/perf/validation_run1.json [...]
  python benchmarks/perf_tables.py paper --gpu a100-80g-sxm --batch 32 --rank 16
  python benchmarks/perf_tables.py sensitivity --gpu a100-80g-sxm --rank 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtllm_bdlora.perf.cost_model import CATEGORIES, SCHEMES  # noqa: E402
from trtllm_bdlora.perf.project import PAPER, paper_rows  # noqa: E402


def bench(paths: list[str]) -> str:
    lines = ["| run | TP | scheme | step ms (median) | p25-p75 | min-max | vs no-LoRA | LoRA collectives / step |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        rep = json.loads(Path(path).read_text())
        none = rep["schemes"]["none"]["median_ms"]
        for scheme, r in rep["schemes"].items():
            lines.append(f"| {Path(path).stem} | {rep['tp']} | {scheme} | {r['median_ms']:.1f} | "
                         f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                         f"{100 * (r['median_ms'] / none - 1):+.1f}% | {r['lora_collectives']} |")
    return "\n".join(lines)


def validation(paths: list[str]) -> str:
    lines = ["| run | TP | scheme | predicted ms | measured ms (median) | measured p25-p75 | error | "
             "predicted: compute / base coll / LoRA coll ms |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        val = json.loads(Path(path).read_text())
        for c in val["cells"]:
            b = c["breakdown_ms"]
            compute = b["base_gemm"] + b["lora"] + b["attention"] + b["other"]
            lines.append(f"| {Path(path).stem} | {c['tp']} | {c['scheme']} | {c['predicted_ms']:.1f} | {c['measured_ms']:.1f} | "
                         f"{c['measured_p25_ms']:.1f}-{c['measured_p75_ms']:.1f} | {c['error_pct']:+.1f}% | "
                         f"{compute:.1f} / {b['base_coll']:.1f} / {b['lora_coll']:.1f} |")
    return "\n".join(lines)


def paper(gpu: str, batch: int, rank: int, context: int, adapters: int) -> str:
    lines = ["| model | scheme | " + " | ".join(f"{c} ms" for c in CATEGORIES) + " | step ms | vs slora | paper |",
             "|---|---|" + "---|" * (len(CATEGORIES) + 3)]
    for model, rows in paper_rows(gpu, batch, rank, context, adapters).items():
        for scheme in SCHEMES:
            r = rows[scheme]
            cells = " | ".join(f"{r[c] * 1e3:.3f}" for c in CATEGORIES)
            ref = f"{PAPER[model]:.2f}x" if scheme == "bdlora" else ""
            lines.append(f"| {model} | {scheme} | {cells} | {r['total'] * 1e3:.3f} | {r['speedup_vs_slora']:.2f}x | {ref} |")
    return "\n".join(lines)


def sensitivity(gpu: str, rank: int, context: int) -> str:
    """BD-LoRA's projected speed-up over slora as the collective latency and the batch vary (TP 8, BD at 2x rank)."""
    import dataclasses

    from trtllm_bdlora.perf.cost_model import Workload, project
    from trtllm_bdlora.perf.presets import MODELS, SYSTEMS
    from trtllm_bdlora.perf.project import KERNEL_FLOOR_S

    base = SYSTEMS[gpu]
    lat = [base.collectives["all_reduce"].latency_s, 25e-6, 50e-6]
    lines = ["| model | batch | " + " | ".join(f"latency {x * 1e6:.0f} us" for x in lat) + " | paper |",
             "|---|---|" + "---|" * (len(lat) + 1)]
    for model in PAPER:
        for batch in (8, 32, 128):
            cells = []
            for latency in lat:
                colls = {k: dataclasses.replace(c, latency_s=latency) for k, c in base.collectives.items()}
                system = dataclasses.replace(base, collectives=colls)
                w = Workload(batch, context, rank, 2 * rank, min(batch, 8), kernel_floor_s=KERNEL_FLOOR_S)
                cells.append(f"{project(MODELS[model], 8, w, system)['bdlora']['speedup_vs_slora']:.2f}x")
            lines.append(f"| {model} | {batch} | " + " | ".join(cells) + f" | {PAPER[model]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["bench", "validation", "paper", "sensitivity"])
    p.add_argument("files", nargs="*")
    p.add_argument("--gpu", default="a100-80g-sxm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--adapters", type=int, default=8)
    args = p.parse_args(argv)
    if args.what == "bench":
        print(bench(args.files))
    elif args.what == "validation":
        print(validation(args.files))
    elif args.what == "sensitivity":
        print(sensitivity(args.gpu, args.rank, args.context))
    else:
        print(paper(args.gpu, args.batch, args.rank, args.context, args.adapters))
    return 0


if __name__ == "__main__":
    sys.exit(main())

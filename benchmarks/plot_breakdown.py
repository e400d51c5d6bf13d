"""Stacked bars of the decode-step breakdown per scheme: CPU (constants measured here, with the measured step as a
marker) and GPU (projected for the paper's settings). Writes docs/perf/step_breakdown.png.

  python benchmarks/plot_breakdown.py docs/perf/validation_run1.json --tp 8 --out docs/perf/step_breakdown.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtllm_bdlora.perf.cost_model import CATEGORIES, SCHEMES  # noqa: E402
from trtllm_bdlora.perf.project import PAPER, paper_rows  # noqa: E402

COLORS = {"base_gemm": "#4c72b0", "lora": "#dd8452", "attention": "#55a868", "other": "#8c8c8c", "base_coll": "#8172b3",
          "lora_coll": "#c44e52"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("validation")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--gpu", default="a100-80g-sxm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--profile", default=None, help="profile JSON (per-category step times measured at TP 1)")
    p.add_argument("--bench", default=None, help="bench --json of the same TP-1 setting (the measured steps)")
    p.add_argument("--out", default="docs/perf/step_breakdown.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = json.loads(Path(args.validation).read_text())
    cells = {c["scheme"]: c for c in val["cells"] if c["tp"] == args.tp}
    gpu = paper_rows(args.gpu, args.batch, args.rank, 1024, min(args.batch, 8))
    panels = []
    if args.profile:
        prof = json.loads(Path(args.profile).read_text())["tp1"]
        bench = json.loads(Path(args.bench).read_text())["schemes"] if args.bench else None
        panels.append(("CPU, smollm2-135m, TP 1 (measured per category)\nbars: one process profiled; dots: bench medians",
                       {s: {k: v * 1e3 for k, v in prof[s].items()} for s in SCHEMES},
                       {s: bench[s]["median_ms"] for s in SCHEMES} if bench else None))
    panels += [(f"CPU, TP {args.tp}, gloo ({val['date']})\nbars: model with constants measured here; dots: bench",
               {s: cells[s]["breakdown_ms"] for s in SCHEMES}, {s: cells[s]["measured_ms"] for s in SCHEMES})]
    for model, rows in gpu.items():
        panels.append((f"{model}, TP 8, {args.gpu} (projected)\nbatch {args.batch}, LoRA r {args.rank}, BD-LoRA r "
                       f"{2 * args.rank}; paper {PAPER[model]:.2f}x",
                       {s: {k: v * 1e3 for k, v in r.items()} for s, r in rows.items()}, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (title, rows, measured) in zip(axes, panels):
        bottom = [0.0] * len(SCHEMES)
        for cat in CATEGORIES:
            vals = [rows[s].get(cat, 0.0) for s in SCHEMES]
            ax.bar(SCHEMES, vals, bottom=bottom, color=COLORS[cat], label=cat)
            bottom = [b + v for b, v in zip(bottom, vals)]
        if measured:
            ax.plot(SCHEMES, [measured[s] for s in SCHEMES], "ko", label="measured step")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("ms per decode step")
        ax.set_ylim(0, 1.1 * max(bottom + (list(measured.values()) if measured else [])))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Summaries of a parity run: mean ± std over seeds per (task, method, rank), a markdown table, and the figure in
the paper's layout (score against adapter parameters on a log2 axis, one line per method, error bars).

  python examples/parity_report.py RUN/results.json   # rewrite RUN/table.md and RUN/parity.png from a finished run
  python examples/parity_report.py A/results.json B/results.json --out DIR
      # B's tasks replace A's (for a task rerun with other settings); writes DIR/results.json, table.md, parity.png
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

TASK_LABELS = {
    "lm": ("held-out perplexity (lower is better)", "{:.3f}"),
    "add": ("exact match, 3-digit addition (higher is better)", "{:.1%}"),
}
METHOD_LABELS = {"lora": "LoRA", "bdlora": "BD-LoRA"}


def summarise(runs: list[dict], path: str) -> list[dict]:
    """One row per (task, method, rank): parameters and the mean / sample std of `path`'s score over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["method"], run["rank"]), []).append(run)
    rows = []
    for (task, method, rank), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "lora", kv[0][2])):
        scores = [g["scores"][path] for g in group]
        rows.append({
            "task": task, "method": method, "rank": rank, "params": group[0]["params"], "seeds": len(scores),
            "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        })
    return rows


def markdown_table(rows_by_path: dict[str, list[dict]], base: dict[str, dict[str, float]]) -> str:
    """Method, rank, parameters and mean ± std per task, for each evaluation path (columns)."""
    paths = list(rows_by_path)
    tasks = sorted({r["task"] for r in next(iter(rows_by_path.values()))}, key=list(TASK_LABELS).index)
    header = ["method", "rank", "parameters"] + [f"{t} ({p})" for t in tasks for p in paths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(task: str, path: str, method: str, rank: int) -> str:
        fmt = TASK_LABELS[task][1]
        row = next((r for r in rows_by_path[path] if (r["task"], r["method"], r["rank"]) == (task, method, rank)), None)
        return "" if row is None else f"{fmt.format(row['mean'])} ± {fmt.format(row['std'])}"

    keys = sorted({(r["method"], r["rank"], r["params"]) for r in next(iter(rows_by_path.values()))},
                  key=lambda k: (k[0] != "lora", k[1]))
    lines.append("| base model | – | 0 | " + " | ".join(
        TASK_LABELS[t][1].format(base[p][t]) for t in tasks for p in paths) + " |")
    for method, rank, params in keys:
        cells = [cell(t, p, method, rank) for t in tasks for p in paths]
        lines.append(f"| {METHOD_LABELS[method]} | {rank} | {params:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_gaps(runs: list[dict], path: str) -> str:
    """Markdown table: per task and LoRA rank, BD-LoRA's score minus its matched LoRA's at the same seed (same
    batches), mean ± std over seeds, and how many seeds BD-LoRA did better on."""
    by_key = {(r["task"], r["method"], r["lora_rank"], r["seed"]): r["scores"][path] for r in runs}
    lines = ["| task | LoRA rank → BD-LoRA rank | BD-LoRA − LoRA (mean ± std) | seeds where BD-LoRA is better |",
             "|---|---|---|---|"]
    for task in [t for t in TASK_LABELS if any(r["task"] == t for r in runs)]:
        for lora_rank in sorted({r["lora_rank"] for r in runs if r["task"] == task}):
            bd_rank = next(r["rank"] for r in runs if (r["task"], r["method"], r["lora_rank"]) == (task, "bdlora", lora_rank))
            seeds = sorted(k[3] for k in by_key if k[:3] == (task, "lora", lora_rank) and (task, "bdlora", lora_rank, k[3]) in by_key)
            gaps = [by_key[(task, "bdlora", lora_rank, s)] - by_key[(task, "lora", lora_rank, s)] for s in seeds]
            better = sum(g < 0 if task == "lm" else g > 0 for g in gaps)
            fmt = "{:+.3f}" if task == "lm" else "{:+.1%}"
            std = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
            lines.append(f"| {task} | {lora_rank} → {bd_rank} | {fmt.format(statistics.fmean(gaps))} ± "
                         f"{fmt.format(std).lstrip('+')} | {better} of {len(gaps)} |")
    return "\n".join(lines)


def plot(rows: list[dict], base: dict[str, float], out: Path, title: str) -> None:
    """One panel per task: mean ± std against adapter parameters (log2 x axis), one line per method."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_LABELS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.0, 5.2 * len(tasks)), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, marker in (("lora", "o"), ("bdlora", "s")):
            pts = sorted((r for r in rows if r["task"] == task and r["method"] == method), key=lambda r: r["params"])
            if not pts:
                continue
            ax.errorbar([r["params"] for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts],
                        marker=marker, capsize=3, label=METHOD_LABELS[method])
            for r in pts:
                ax.annotate(f"r={r['rank']}", (r["params"], r["mean"]), textcoords="offset points",
                            xytext=(4, 6) if method == "lora" else (-8, -14), fontsize=7)
        if task in base:  # as text: a line at the base model's score would flatten the curves
            ax.set_title(f"base model: {TASK_LABELS[task][1].format(base[task])}", fontsize=9)
        ax.set_xscale("log", base=2)
        params = sorted({r["params"] for r in rows if r["task"] == task})
        ax.set_xlim(params[0] / 2**0.4, params[-1] * 2**0.4)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1e6:.3g}M"))
        ax.minorticks_off()
        if task == "add":
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_xlabel("adapter parameters (log2 scale)")
        ax.set_ylabel(TASK_LABELS[task][0])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    """table.md (both evaluation paths, then BD-LoRA's paired gap) and parity.png (the serving path) into out."""
    runs, s = results["runs"], results["settings"]
    rows = {path: summarise(runs, path) for path in ("peft", "engine")}
    (out / "table.md").write_text(markdown_table(rows, results["base"]) + "\n\n" + paired_gaps(runs, "engine") + "\n")
    plot(rows["engine"], results["base"]["engine"], out / "parity.png",
         f"smollm2-135m, LoRA vs BD-LoRA (nblocks {s['nblocks']}),\nmean ± std over {len(s['seeds'])} seed(s), "
         f"scored through the TP-{s['tp']} serving path")


def merge_results(parts: list[tuple[str, dict]]) -> dict:
    """One results dict from several runs: each later run's tasks replace the earlier runs' (runs, base scores and
    that task's settings); the commands, timings and agreement problems of every part are kept."""
    merged = json.loads(json.dumps(parts[0][1]))
    merged["parts"] = []
    for i, (path, part) in enumerate(parts):
        tasks = part["settings"]["tasks"]
        if i:
            merged["runs"] = [r for r in merged["runs"] if r["task"] not in tasks] + part["runs"]
            for side in ("peft", "engine"):
                merged["base"][side].update({t: part["base"][side][t] for t in tasks})
            merged["settings"].update({k: v for k, v in part["settings"].items() if k.split("_")[0] in tasks})
            merged["agreement"]["problems"] += part["agreement"]["problems"]
        merged["parts"].append({"results": path, "tasks": tasks, "command": part["command"], "date": part["date"],
                                "seconds": part["seconds"]})
    merged["settings"]["tasks"] = sorted({t for _, p in parts for t in p["settings"]["tasks"]}, key=list(TASK_LABELS).index)
    return merged


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from example_deps import require

    require("matplotlib")

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json of finished runs; later ones' tasks replace earlier ones'")
    ap.add_argument("--out", default=None, help="folder for the merged results.json, table.md, parity.png")
    args = ap.parse_args()
    parts = [(p, json.loads(Path(p).read_text())) for p in args.results]
    if len(parts) == 1 and not args.out:
        out, results = Path(args.results[0]).parent, parts[0][1]
    else:
        out, results = Path(args.out or "."), merge_results(parts)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    print((out / "table.md").read_text())

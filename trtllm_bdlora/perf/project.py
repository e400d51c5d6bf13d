"""`trtllm-bdlora project`: projected decode-step breakdown per scheme on a multi-GPU system, and speed-up over slora.

  trtllm-bdlora project --model llama-3.1-70b --tp 8 --gpu a100-80g-sxm --batch 32 --rank 16 --bd-rank 32
  trtllm-bdlora project --model path/to/config.json --tp 4 --gpu h100-sxm --batch 8 --rank 64 --kernel-times gpu_suite.json
  trtllm-bdlora project --paper            # the paper's settings beside its reported speed-ups
"""

from __future__ import annotations

import bisect
import json

from trtllm_bdlora.config import ProjectConfig
from trtllm_bdlora.perf.cost_model import CATEGORIES, KernelTimes, Workload, project
from trtllm_bdlora.perf.presets import MODELS, SYSTEMS, resolve_model

# "Block-Diagonal LoRA for Eliminating Communication Overhead in Tensor Parallel LoRA Serving" (NeurIPS 2025):
# end-to-end speed-up of BD-LoRA (about twice the LoRA rank) over S-LoRA sharding on 8x A100.
PAPER = {"llama-3.1-8b": 1.63, "llama-3.1-70b": 1.79}
KERNEL_FLOOR_S = 3e-6  # smallest GPU kernel time, launch included (estimate; replaced by measured times when given)


def load_kernel_times(path: str, adapters: int, dtype: str = "bfloat16") -> KernelTimes:
    """Lookup into gpu_suite.json's kernel_times: exact (kind, K, M, rank) at the smallest measured adapter count
    >= `adapters` (else the largest), linear in T between the measured token counts (extrapolated from the nearest
    two beyond them); None where nothing was measured."""
    import statistics

    entries = [e for e in json.loads(open(path).read())["kernel_times"] if e["dtype"] == dtype]
    counts = sorted({e["adapters"] for e in entries})
    if not counts:
        return lambda *a: None
    use = next((c for c in counts if c >= adapters), counts[-1])
    grouped: dict[tuple, dict[int, list[float]]] = {}
    for e in entries:
        if e["kind"] == "gemm" or e["adapters"] == use:
            grouped.setdefault((e["kind"], e["K"], e["M"], e["rank"]), {}).setdefault(e["T"], []).append(e["us"] * 1e-6)
    table = {key: sorted((t, statistics.median(v)) for t, v in by_t.items()) for key, by_t in grouped.items()}

    def lookup(module: str, kind: str, t: int, k: int, m: int, rank: int) -> float | None:
        pts = table.get((kind, k or rank, m or rank, rank))
        if not pts:
            return None
        if len(pts) == 1:
            return pts[0][1]
        i = min(max(bisect.bisect_left([p[0] for p in pts], t), 1), len(pts) - 1)
        (t0, y0), (t1, y1) = pts[i - 1], pts[i]
        return max(0.0, y0 + (y1 - y0) * (t - t0) / (t1 - t0))

    lookup.adapters = use
    return lookup


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
    head = f"{'scheme':<12}" + "".join(f"{c + ' ms':>14}" for c in CATEGORIES) + f"{'step ms':>11}{'vs slora':>10}"
    lines = [title, head]
    for scheme, r in rows.items():
        lines.append(f"{scheme:<12}" + "".join(f"{r[c] * 1e3:>14.3f}" for c in CATEGORIES)
                     + f"{r['total'] * 1e3:>11.3f}{r.get('speedup_vs_slora', float('nan')):>9.2f}x")
    return "\n".join(lines)


def paper_rows(gpu: str, batch: int, rank: int, context: int, adapters: int) -> dict:
    """The paper's comparison: TP 8, BD-LoRA at twice the LoRA rank, for both models."""
    out = {}
    for model in PAPER:
        w = Workload(batch, context, rank, 2 * rank, adapters, kernel_floor_s=KERNEL_FLOOR_S)
        out[model] = project(MODELS[model], 8, w, SYSTEMS[gpu])
    return out


def project_main(config: ProjectConfig) -> int:
    system = SYSTEMS[config.gpu]
    adapters = config.adapters or min(config.batch, 8)
    if config.paper:
        result = paper_rows(config.gpu, config.batch, config.rank, config.context, adapters)
        for model, rows in result.items():
            print(format_table(rows, f"{model}  tp 8  {config.gpu}  batch {config.batch}  rank {config.rank} (bdlora "
                                     f"{2 * config.rank})  context {config.context}  adapters {adapters}"))
            print(f"bdlora vs slora: {rows['bdlora']['speedup_vs_slora']:.2f}x projected, paper {PAPER[model]:.2f}x\n")
    else:
        shape = resolve_model(config.model)
        w = Workload(config.batch, config.context, config.rank, config.bd_rank or config.rank, adapters, kernel_floor_s=KERNEL_FLOOR_S)
        kt = load_kernel_times(config.kernel_times, adapters) if config.kernel_times else None
        result = project(shape, config.tp, w, system, kt)
        print(format_table(result, f"{config.model}  tp {config.tp}  {config.gpu}  batch {config.batch}  rank {config.rank}  "
                                   f"bdlora rank {w.bd_rank}  context {config.context}  adapters {adapters}  compute: "
                                   f"{'measured kernel times + roofline' if kt else 'roofline'}"))
        if kt:
            print(f"kernel times measured with {kt.adapters} adapters per batch (asked: {adapters})")
        print(f"bdlora vs slora: {result['bdlora']['speedup_vs_slora']:.2f}x")
    if config.json:
        with open(config.json, "w") as f:
            json.dump({"system": system.name, "sources": system.sources, "result": result}, f, indent=2)
    return 0

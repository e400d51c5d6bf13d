"""The GPU suite: roofline, the BD-LoRA kernel against references and baselines, and the engine on CUDA.

One command on one GPU (under 8 minutes on an H100), writing OUT/gpu_suite.json and OUT/gpu_suite.md and
exiting non-zero if any correctness check fails:

  python benchmarks/gpu_suite.py --out "$OUT"            # the full suite (CUDA)
  python benchmarks/gpu_suite.py --smoke --out /tmp/s    # the same code on CPU, tiny shapes, Triton interpreter

Kernel part: for Llama-3.1-8B and -70B, the per-rank TP-8 shapes of all seven modules, T in {1, 8, 64, 256, 1024},
r in {16, 64, 128}, 1/4/16 adapters, fp16 and bf16. BD-LoRA's per-rank work is rank r/8 (and 2r/8, the paper's
"BD-LoRA at twice the rank"); each is checked against a float32 torch reference and timed against the bytes-moved
roofline (measured copy bandwidth), the module's base GEMM (cuBLAS), a gather + bmm BGMV (S-LoRA/punica style)
and PEFT's per-adapter loop on the same work. The per-rank kernels of `replicated` (rank r) and `slora` (shrink
and expand) are timed too, so `trtllm-bdlora project --kernel-times OUT/gpu_suite.json` can use them.
Engine part: benchmarks/suite_engine.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import suite_kernels as sk  # noqa: E402
from trtllm_bdlora.perf.cost_model import Workload, lora_kernels  # noqa: E402
from trtllm_bdlora.perf.presets import MODELS, module_shapes  # noqa: E402

TP = 8
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}  # relative L2 error vs float32


def roofline(device: str, smoke: bool) -> dict:
    """Measured device-to-device copy bandwidth (bytes read + written) and bf16 GEMM FLOP/s."""
    cuda = device == "cuda"
    n = (1 << 30) if cuda else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t_copy = sk.time_fn(lambda i: dst.copy_(src), 1, cuda, reps=10)
    size = 8192 if cuda else 128
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    t_mm = sk.time_fn(lambda i: a @ b, 1, cuda, reps=10)
    return {"copy_gbs": 2 * n / t_copy / 1e9, "bf16_gemm_tflops": 2 * size ** 3 / t_mm / 1e12,
            "copy_bytes": 2 * n, "gemm_size": size}


def sweep_points(args) -> list[dict]:
    points = []
    for model in args.models:
        for module, (K, M, role) in module_shapes(MODELS[model], TP).items():
            if module not in args.modules:
                continue
            if args.smoke:
                K, M = max(16, K // 256), max(16, M // 256)
            for dtype in args.dtypes:
                for T in args.tokens:
                    for adapters in args.adapters:
                        points.append({"model": model, "module": module, "role": role, "K": K, "M": M,
                                       "dtype": dtype, "T": T, "adapters": adapters})
    return points


def run_point(pt: dict, ranks: list[int], device: str, cuda: bool, copy_gbs: float, inject: bool) -> tuple[dict, list]:
    """One (module, T, adapters, dtype): every kernel the schemes need, checked and timed. Returns the summary row
    and the kernel-time entries."""
    dtype = getattr(torch, pt["dtype"])
    T, K, M, n = pt["T"], pt["K"], pt["M"], pt["adapters"]
    seed = zlib.crc32(f"{pt['model']}/{pt['module']}/{T}/{n}/{pt['dtype']}".encode())
    entries, row, worst = [], dict(pt), 0.0
    gemm, copies, gemm_bytes = sk.gemm_fn(T, K, M, dtype, device, seed)
    row["base_gemm_us"] = sk.time_fn(gemm, copies, cuda) * 1e6
    entries.append({"module": pt["module"], "kind": "gemm", "T": T, "K": K, "M": M, "rank": 0, "us": row["base_gemm_us"]})

    def kernel(kind: str, k: int, m: int, rank: int, baselines: bool = False) -> float:
        nonlocal worst
        k, m = (k or rank), (m or rank)  # shrink: output width = rank; expand: input width = rank
        p = sk.Problem(T, k, m, rank, n, dtype, device, seed + rank)
        fn = sk.bdlora_fn(p)
        err = sk.check(p, fn, TOLERANCE[dtype], inject)
        worst = max(worst, err / TOLERANCE[dtype])
        us = sk.time_fn(fn, len(p.sets), cuda) * 1e6
        entries.append({"module": pt["module"], "kind": kind, "T": T, "K": k, "M": m, "rank": rank, "us": us,
                        "rel_err": err, "roofline_pct": 100 * p.nbytes / (copy_gbs * 1e9) / (us / 1e6)})
        if baselines:
            for name, make in (("bgmv", sk.bgmv_fn), ("loop", sk.loop_fn)):
                b = make(p)
                b_err = sk.check(p, b, TOLERANCE[dtype])
                worst = max(worst, b_err / TOLERANCE[dtype])
                row[f"{name}_us"] = sk.time_fn(b, len(p.sets), cuda) * 1e6
        return us

    for r in ranks:
        for label, bd_rank in ((f"bdlora_r{r}", r), (f"bdlora2x_r{r}", 2 * r)):
            w = Workload(T, 0, r, bd_rank, n)
            (_, k, m, rank), = lora_kernels("bdlora", K, M, pt["role"], w, TP)
            row[f"{label}_us"] = kernel("fused", k, m, rank, baselines=(label == f"bdlora_r{r}"))
            if label == f"bdlora_r{r}":
                row[f"bgmv_r{r}_us"], row[f"loop_r{r}_us"] = row.pop("bgmv_us"), row.pop("loop_us")
                row[f"bdlora_r{r}_roofline_pct"] = entries[-1]["roofline_pct"]
        w = Workload(T, 0, r, 2 * r, n)
        (_, k, m, rank), = lora_kernels("replicated", K, M, pt["role"], w, TP)
        row[f"replicated_r{r}_us"] = kernel("fused", k, m, rank)
        row[f"slora_r{r}_us"] = sum(kernel(kind, k, m, rank) for kind, k, m, rank in lora_kernels("slora", K, M, pt["role"], w, TP))
    row["worst_err_over_tol"] = worst
    return row, entries


def write_report(result: dict, out: Path) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_suite.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    meta, roof = result["meta"], result["roofline"]
    smoke = " (SMOKE: CPU interpreter, tiny shapes; no GPU figures)" if meta["smoke"] else ""
    lines = [f"# GPU suite: {meta['device']}, {meta['date']}{smoke}",
             "", f"Copy bandwidth {roof['copy_gbs']:.0f} GB/s (read + write); bf16 GEMM {roof['bf16_gemm_tflops']:.1f} TFLOP/s.",
             f"Correctness: {result['checks']['passed']}/{result['checks']['total']} kernel checks within tolerance "
             f"(worst error / tolerance {result['checks']['worst']:.3g}).", ""]
    r0 = meta["ranks"][0]
    cols = ["model", "module", "dtype", "T", "adapters", "base_gemm_us", f"bdlora_r{r0}_us", f"bdlora_r{r0}_roofline_pct",
            f"bgmv_r{r0}_us", f"loop_r{r0}_us"] + [f"{s}_r{r}_us" for r in meta["ranks"] for s in ("bdlora2x", "replicated", "slora")]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["kernels"]:
        if "error" in row:
            where = " | ".join(str(row[c]) for c in ("model", "module", "dtype", "T", "adapters"))
            lines.append(f"| {where} | ERROR: {row['error']} |")
            continue
        lines.append("| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    if result.get("engine"):
        from benchmarks.suite_engine import markdown as engine_md

        lines += ["", engine_md(result["engine"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_suite.json and gpu_suite.md")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--kernel-budget-s", type=float, default=330.0, help="stop the kernel sweep after this long")
    p.add_argument("--inject-error", action="store_true", help=argparse.SUPPRESS)  # self-test: must exit non-zero
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("gpu_suite: no CUDA GPU; use --smoke for the CPU check (no GPU figures are produced)", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    args.models = list(MODELS)
    args.tokens, args.ranks, args.adapters = [1, 8, 64, 256, 1024], [16, 64, 128], [1, 4, 16]
    args.dtypes, args.modules = ["float16", "bfloat16"], list(module_shapes(MODELS["llama-3.1-8b"], TP))
    if args.smoke:  # the same code on a column and a row module, tiny shapes
        args.models, args.tokens, args.ranks, args.adapters = args.models[:1], [1, 8], [16], [4]
        args.modules, sk.CPU_REPS = ["q_proj", "down_proj"], 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    roof = roofline(device, args.smoke)
    print(f"roofline: copy {roof['copy_gbs']:.0f} GB/s, bf16 GEMM {roof['bf16_gemm_tflops']:.1f} TFLOP/s", flush=True)
    rows, entries = [], []
    points = sweep_points(args)
    for i, pt in enumerate(points):
        if time.time() - t0 > args.kernel_budget_s:
            print(f"kernel sweep stopped at its time budget after {i}/{len(points)} points", flush=True)
            break
        try:
            row, ent = run_point(pt, args.ranks, device, cuda, roof["copy_gbs"], args.inject_error)
        except Exception as err:  # keep going: one broken shape must not lose the rest of a short GPU lease
            row, ent = {**pt, "error": f"{type(err).__name__}: {err}", "worst_err_over_tol": float("inf")}, []
            print(f"ERROR at {pt}: {row['error']}", flush=True)
        rows.append(row)
        entries += [{**e, "model": pt["model"], "dtype": pt["dtype"], "adapters": pt["adapters"]} for e in ent]
        if i % 20 == 0 or i == len(points) - 1:
            print(f"kernels {i + 1}/{len(points)}  {time.time() - t0:.0f}s", flush=True)
    checks = [e for e in entries if "rel_err" in e]
    tol = {e["dtype"]: TOLERANCE[getattr(torch, e["dtype"])] for e in checks}
    failed = [e for e in checks if not e["rel_err"] <= tol[e["dtype"]]] + [r for r in rows if not r["worst_err_over_tol"] <= 1]
    result = {
        "meta": {"device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)", "smoke": args.smoke,
                 "date": time.strftime("%Y-%m-%d"), "tp": TP, "ranks": args.ranks, "torch": torch.__version__,
                 "command": " ".join(sys.argv)},
        "roofline": roof, "kernels": rows, "kernel_times": entries,
        "complete": len(rows) == len(points), "points": len(points),
        "checks": {"total": len(checks), "passed": len(checks) - sum(1 for e in checks if not e["rel_err"] <= tol[e["dtype"]]),
                   "worst": max([r["worst_err_over_tol"] for r in rows], default=0.0)},
    }
    if not args.skip_engine:
        from benchmarks.suite_engine import run_engine

        try:
            result["engine"] = run_engine(device, args.smoke)
        except Exception as err:  # e.g. a PEFT without BdLoraConfig (< 0.18) on the GPU image: keep the kernel results
            result["engine"] = {"checks": [{"check": "engine part ran", "max_rel_err": float("inf"), "ok": False,
                                            "error": f"{type(err).__name__}: {err}"}], "step_times": []}
            print(f"ERROR in the engine part: {err}", flush=True)
        failed += [c for c in result["engine"]["checks"] if not c["ok"]]
    result["meta"]["seconds"] = time.time() - t0
    write_report(result, out)
    print(markdown(result)[-6000:])
    if failed:
        print(f"gpu_suite: {len(failed)} correctness checks FAILED (see {out / 'gpu_suite.json'})", file=sys.stderr)
        return 1
    print(f"gpu_suite: all checks passed in {time.time() - t0:.0f}s; wrote {out / 'gpu_suite.json'} and gpu_suite.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Validate the step model where it can be measured: CPU ranks on this machine.

The model is given CPU constants measured here, then compared with `trtllm-bdlora bench` at TP 2, 4 and 8:
  compute     one rank's decode step (one process, one thread, collectives stubbed out), split into base GEMMs
              (the rank's four group GEMMs and the LM head, timed separately), LoRA (the op's calls), attention
              and the rest. It is measured while min(N, cores) - 1 other processes stream weights of the same
              size, as the other ranks do, so that sharing the memory bandwidth is in the constant; ranks beyond
              the machine's cores time-share them: x max(1, N / cores)
  collectives a latency-bandwidth fit per collective type and world size from a micro-benchmark under mpirun of the
              engine's collectives (Comm: shared memory on one machine; broadcasts over gloo)
Same model code as the GPU projection (perf/cost_model.py): step_collectives counts and sizes, breakdown sums.

  trtllm-bdlora cpu-validate --out docs/perf/validation.json     (under the measurement lock)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trtllm_bdlora.config import CpuValidateConfig
from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
from trtllm_bdlora.perf.cost_model import SCHEMES, Workload, breakdown, step_collectives

SIZES = [1 << k for k in range(6, 19, 2)]  # 64 B .. 256 KiB


class StubComm(Comm):
    """Rank 0 of a `world`-rank group with free collectives of the right shapes (compute is all that is timed)."""

    def all_reduce(self, t, category="base"):
        self.log.record("all_reduce", t, category)
        return t

    def all_gather(self, t, category="lora"):
        self.log.record("all_gather", t, category)
        return torch.cat([t] * self.world, dim=-1)

    def broadcast_json(self, obj=None):
        return obj


def gloo_worker(out: str, reps: int, interface: str | None = None) -> None:
    """Under mpirun: median time of all_reduce / all_gather (output bytes) / broadcast per size; rank 0 writes.
    `interface`: the ranks' --comm-interface (a launch across hosts)."""
    import torch.distributed as dist

    from trtllm_bdlora.distributed.launch import init_ranks, mpi_world_size, shutdown

    torch.set_num_threads(1)
    comm = init_ranks(mpi_world_size(), "cpu", interface)
    res: dict = {}
    for kind in ("all_reduce", "all_gather", "broadcast"):
        for nbytes in SIZES:
            t = torch.ones(max(1, nbytes // 4 // (comm.world if kind == "all_gather" else 1)))
            times = []
            for i in range(reps + 3):
                dist.barrier()
                t0 = time.perf_counter()
                if kind == "all_reduce":  # the engine's own path: shared memory on one machine, else gloo
                    comm.all_reduce(t)
                elif kind == "all_gather":
                    comm.all_gather(t)
                else:
                    dist.broadcast(t, 0)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            res.setdefault(kind, []).append((nbytes, statistics.median(times)))
    shutdown(comm)
    if comm.rank == 0:
        Path(out).write_text(json.dumps({"world": comm.world, "samples": res}))


def fit(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (latency s, seconds per byte) of t = a + b * bytes."""
    xs, ys = [s[0] for s in samples], [s[1] for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, max(b, 0.0)


def measure_gloo(tp: int, reps: int) -> dict:
    from trtllm_bdlora.distributed.launch import mpirun_command

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gloo.json"
        cmd = mpirun_command(tp, [])[:-3] + [sys.executable, "-m", "trtllm_bdlora.perf.cpu_validate", "gloo-worker",
                                              str(out), str(reps)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL)
        raw = json.loads(out.read_text())
    return {kind: {"latency_s": a, "s_per_byte": b, "samples": s} for kind, s in raw["samples"].items()
            for a, b in [fit(s)]}


def load_worker(nbytes: int) -> None:
    """Stream a float32 weight of `nbytes` through a batch-8 GEMM, one thread, until killed: another rank's traffic."""
    torch.set_num_threads(1)
    k = 1024
    w = torch.randn(max(1, nbytes // (4 * k)), k)
    x = torch.randn(8, k)
    while True:
        x @ w.T


def start_streams(count: int, nbytes: int) -> list[subprocess.Popen]:
    """`count` processes streaming `nbytes` each (stand-ins for the other ranks' memory traffic)."""
    procs = [subprocess.Popen([sys.executable, "-m", "trtllm_bdlora.perf.cpu_validate", "load-worker", str(nbytes)],
                              stdin=subprocess.DEVNULL) for _ in range(count)]
    if procs:
        time.sleep(2.0)  # let them allocate and start streaming
    return procs


def stop_streams(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def measure_compute(base, tp: int, config: CpuValidateConfig) -> dict[str, dict[str, float]]:
    """Per scheme: median per-step seconds of base_gemm, lora, attention, other for rank 0, with min(tp, cores) - 1
    other processes streaming as many weight bytes as a rank does."""
    import trtllm_bdlora.engine.llama as llama
    from trtllm_bdlora.perf.bench import _select, setup_schemes

    torch.set_num_threads(1)
    comm = StubComm(0, tp)
    engine, pools = setup_schemes(comm, base, max_loras=config.max_loras, dtype=config.dtype,
                                  max_lora_rank=config.max_lora_rank, num_adapters=config.num_adapters, rank=config.rank)
    acc = {"lora": 0.0, "attention": 0.0}
    orig_lora, orig_attn = llama.apply_lora_group, llama.TPLlama._attention

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            acc[key] += time.perf_counter() - t0
            return out
        return wrapper

    llama.apply_lora_group, llama.TPLlama._attention = timed("lora", orig_lora), timed("attention", orig_attn)
    model = engine.model
    rank_bytes = sum(L[k].nbytes for L in model.layers for k in ("qkv", "o", "gate_up", "down")) + model.lm_head.nbytes
    streams = start_streams(min(tp, os.cpu_count() or 1) - 1, rank_bytes)
    try:
        out = {}
        gen = torch.Generator().manual_seed(0)
        for k, scheme in enumerate(SCHEMES):
            _select(engine, pools, scheme)
            ids = [None] * config.batch if scheme == "none" else [1 + i % config.num_adapters for i in range(config.batch)]
            loads, slots = pools[scheme].assign(ids)
            prompts = [torch.randint(0, engine.shape.vocab_size, (config.prompt_len,), generator=gen).tolist() for _ in ids]
            engine.execute(StepPlan(loads=loads, chunks=[SeqChunk(k * 100 + i, p, 0, s)
                                                    for i, (p, s) in enumerate(zip(prompts, slots))]))
            samples = []
            for step in range(config.steps + 1):
                acc.update(lora=0.0, attention=0.0)
                t0 = time.perf_counter()
                engine.execute(StepPlan(chunks=[SeqChunk(k * 100 + i, [1], config.prompt_len + step, s)
                                                 for i, s in enumerate(slots)]))
                total = time.perf_counter() - t0
                if step:
                    samples.append((total, acc["lora"], acc["attention"]))
            out[scheme] = {"total": statistics.median(s[0] for s in samples), "lora": statistics.median(s[1] for s in samples),
                           "attention": statistics.median(s[2] for s in samples)}
        gemm = _base_gemm_time(engine, config.batch)
    finally:
        stop_streams(streams)
        llama.apply_lora_group, llama.TPLlama._attention = orig_lora, orig_attn
    for row in out.values():
        row["base_gemm"] = gemm
        row["other"] = max(0.0, row["total"] - gemm - row["lora"] - row["attention"])
    return out


def _base_gemm_time(engine, batch: int, reps: int = 20) -> float:
    """Median time of one step's base GEMMs on this rank's shards (four per layer and the LM head)."""
    model = engine.model
    xs = {}
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for L in model.layers:
            for key in ("qkv", "o", "gate_up", "down"):
                w = L[key]
                x = xs.setdefault(w.shape[1], torch.randn(batch, w.shape[1], dtype=w.dtype))
                w(x)
        x = xs.setdefault(model.lm_head.shape[1], torch.randn(batch, model.lm_head.shape[1], dtype=model.lm_head.dtype))
        model.lm_head(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def predict(compute: dict, gloo: dict, shape, tp: int, config: CpuValidateConfig, cores: int) -> dict[str, dict[str, float]]:
    """The model's step breakdown per scheme from the CPU constants."""
    from trtllm_bdlora.perf.presets import System

    w = Workload(config.batch, config.prompt_len, -(-config.rank // tp) * tp, -(-config.rank // tp) * tp, config.num_adapters,
                 dtype_bytes=4)
    cpu = System("cpu", tp, 0.0, 0.0, {})

    def coll(kind, nbytes):
        g = gloo[kind]
        return g["latency_s"] + g["s_per_byte"] * nbytes

    rows = {}
    for scheme in SCHEMES:
        colls = step_collectives(shape, tp, w, scheme, parallel_lm_head=True) + [("broadcast", 512, "base_coll", 2)]
        rows[scheme] = breakdown(compute[scheme], colls, cpu, tp, contention=max(1.0, tp / cores), collective_fn=coll)
    return rows


def run_bench(model_dir: str, tp: int, config: CpuValidateConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "trtllm_bdlora", "bench", "--model", model_dir, "--tp", str(tp), "--batch",
               str(config.batch), "--num-adapters", str(config.num_adapters), "--rank", str(config.rank), "--steps",
               str(config.steps), "--prompt-len", str(config.prompt_len), "--threads", "1", "--json", str(out),
               "--max-loras", str(config.max_loras)] + (["--max-lora-rank", str(config.max_lora_rank)] if config.max_lora_rank else [])
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        return json.loads(out.read_text())


def validate(config: CpuValidateConfig) -> int:
    """Measure the CPU constants at each --tp, run `bench` there, and write predicted against measured to --out."""
    if config.profile_only:
        return write_profile(config)
    from trtllm_bdlora.llama.loader import load_base_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = config.model or str(_random_model(Path(tmp) / "model"))
        base = load_base_model(model_dir)
        cores = os.cpu_count() or 1
        cells, fits = [], {}
        for tp in config.tp:
            gloo = measure_gloo(tp, config.reps)
            compute = measure_compute(base, tp, config)
            measured = run_bench(model_dir, tp, config)
            predicted = predict(compute, gloo, base.shape, tp, config, cores)
            for scheme in SCHEMES:
                m = measured["schemes"][scheme]
                cells.append({"tp": tp, "scheme": scheme, "predicted_ms": predicted[scheme]["total"] * 1e3,
                              "measured_ms": m["median_ms"], "measured_p25_ms": m["p25_ms"], "measured_p75_ms": m["p75_ms"],
                              "error_pct": 100 * (predicted[scheme]["total"] * 1e3 / m["median_ms"] - 1),
                              "breakdown_ms": {k: v * 1e3 for k, v in predicted[scheme].items()}})
                c = cells[-1]
                print(f"tp {tp} {scheme:<11} predicted {c['predicted_ms']:8.1f} ms  measured {m['median_ms']:8.1f} ms"
                      f"  ({m['p25_ms']:.1f}-{m['p75_ms']:.1f})  error {c['error_pct']:+6.1f}%", flush=True)
            fits[tp] = {k: {"latency_us": v["latency_s"] * 1e6, "us_per_kib": v["s_per_byte"] * 1024e6}
                        for k, v in gloo.items()}
    shape = base.shape
    Path(config.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "cores": cores, "command": " ".join(sys.argv),
        "compute_method": "rank 0 alone in its process, with min(N, cores) - 1 other processes streaming a rank's weight bytes",
        "model": {"hidden": shape.hidden_size, "intermediate": shape.intermediate_size, "layers": shape.num_layers,
                  "heads": shape.num_heads, "kv_heads": shape.num_kv_heads, "vocab": shape.vocab_size},
        "workload": {"batch": config.batch, "adapters": config.num_adapters, "rank": config.rank, "steps": config.steps,
                     "prompt_len": config.prompt_len},
        "gloo_fits": fits, "cells": cells}, indent=1))
    return 0


def write_profile(config: CpuValidateConfig) -> int:
    """The per-category step profile (seconds per step, medians) of rank 0 at each TP, as docs/perf/profile_*.json."""
    from trtllm_bdlora.llama.loader import load_base_model

    base = load_base_model(config.model or "smollm2-135m")
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "model": config.model or "smollm2-135m",
           "batch": config.batch, "adapters": config.num_adapters, "rank": config.rank,
           "note": f"rank 0, 1 thread, collectives stubbed, min(N, cores) - 1 other weight streams; medians of "
                   f"{config.steps} decode steps (s)"}
    for tp in config.tp:
        out[f"tp{tp}"] = measure_compute(base, tp, config)
        print(f"tp {tp}: " + "  ".join(f"{s} {v['total'] * 1e3:.1f} ms (LoRA {v['lora'] * 1e3:.1f})"
                                       for s, v in out[f"tp{tp}"].items()), flush=True)
    Path(config.out).write_text(json.dumps(out, indent=1))
    return 0


def _random_model(directory: Path) -> Path:
    """A random Llama with 8 heads, so TP 2, 4 and 8 all divide it (smollm2-135m has 9)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


if __name__ == "__main__":  # its workers: `gloo-worker OUT REPS [IFACE]` (under mpirun), `load-worker BYTES`
    if sys.argv[1:2] == ["gloo-worker"]:
        gloo_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    elif sys.argv[1:2] == ["load-worker"]:
        load_worker(int(sys.argv[2]))
    else:
        sys.exit("the command is `trtllm-bdlora cpu-validate`; this module runs only its workers")

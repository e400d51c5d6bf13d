"""`trtllm-bdlora bench`: decode step time for no LoRA vs bdlora vs slora vs replicated, same adapters.

All four schemes share one model (same base weights, same process) and their decode steps are interleaved
round-robin, rotating the order every round, so that load from other processes on a shared machine falls on
every scheme alike. Each scheme has its own adapter pool and its own sequences.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch

from trtllm_bdlora.adapters.lora import Adapter, LoraFactors
from trtllm_bdlora.config import BenchConfig, EngineConfig
from trtllm_bdlora.distributed.hosts import check_hosts_agree
from trtllm_bdlora.distributed.launch import init_ranks, shutdown
from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
from trtllm_bdlora.llama.shape import LLAMA_MODULES, LlamaShape, module_role

SCHEMES = ("none", "bdlora", "slora", "replicated")


def random_bd_adapter(shape: LlamaShape, rank: int, nblocks: int, seed: int) -> Adapter:
    """A BD-LoRA adapter with random non-zero factors (column: block-diagonal B, row: block-diagonal A)."""
    gen = torch.Generator().manual_seed(seed)
    rank = math.ceil(rank / nblocks) * nblocks
    modules = {}
    for layer in range(shape.num_layers):
        for name in LLAMA_MODULES:
            inp, out = shape.module_dims(name)
            role = module_role(name)
            a_cols = inp // nblocks if role == "row" else inp
            b_cols = rank // nblocks if role == "column" else rank
            a = torch.randn(rank, a_cols, generator=gen) / math.sqrt(inp)
            b = torch.randn(out, b_cols, generator=gen) * 0.01
            modules[(layer, name)] = LoraFactors(a, b, 1.0, role, "B" if role == "column" else "A", nblocks)
    return Adapter(f"random-{seed}", "bdlora", rank, nblocks, modules)


def _select(engine, pools: dict, scheme: str) -> None:
    """Point the shared model at one scheme's adapter pool."""
    engine.pool = engine.model.pool = pools[scheme]
    engine.model.scheme = "bdlora" if scheme == "none" else scheme


def _step(engine, pools: dict, scheme: str | None, plan: StepPlan | None = None) -> None:
    """Rank 0: send a plan tagged with its scheme and run it; None stops the workers."""
    engine.comm.broadcast_json(None if scheme is None else {"scheme": scheme, "plan": plan.to_json()})
    if scheme is not None:
        _select(engine, pools, scheme)
        engine.execute(plan)


def _follow(engine, pools: dict) -> None:
    while (tagged := engine.comm.broadcast_json()) is not None:
        _select(engine, pools, tagged["scheme"])
        engine.execute(StepPlan.from_json(tagged["plan"]))


def _lead(engine, pools: dict, config: BenchConfig, adapter_ids: list[int | None]) -> dict:
    """Prefill every scheme's batch, then time interleaved decode steps. Returns per-scheme samples (s)."""
    gen = torch.Generator().manual_seed(0)
    slots, seq0 = {}, {}
    for k, scheme in enumerate(SCHEMES):
        ids = [None] * config.batch if scheme == "none" else adapter_ids
        loads, slots[scheme] = pools[scheme].assign(ids)
        seq0[scheme] = k * config.batch
        prompts = [torch.randint(0, engine.shape.vocab_size, (config.prompt_len,), generator=gen).tolist() for _ in ids]
        chunks = [SeqChunk(seq0[scheme] + i, p, 0, s) for i, (p, s) in enumerate(zip(prompts, slots[scheme]))]
        _step(engine, pools, scheme, StepPlan(loads=loads, chunks=chunks))
    samples: dict = {s: [] for s in SCHEMES}
    collectives: dict = {}
    for step in range(config.steps + 1):  # the first round warms up and is not counted
        order = SCHEMES[step % 4:] + SCHEMES[: step % 4]
        for scheme in order:
            chunks = [SeqChunk(seq0[scheme] + i, [1], config.prompt_len + step, s) for i, s in enumerate(slots[scheme])]
            engine.comm.log.clear()
            t0 = time.perf_counter()
            _step(engine, pools, scheme, StepPlan(chunks=chunks))
            if engine.comm.device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                samples[scheme].append(time.perf_counter() - t0)
            collectives[scheme] = engine.comm.log.summary()
    _step(engine, pools, None)
    return {"samples": samples, "collectives": collectives}


def summarize(samples: list[float]) -> dict:
    """Median, quartiles, min and max of step times, in ms."""
    ms = sorted(t * 1e3 for t in samples)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": ms[0], "max_ms": ms[-1],
            "n": len(ms)}


def preflight(config: BenchConfig) -> None:
    """What can be refused before any rank starts: the model, the TP its heads must divide, the interface."""
    from trtllm_bdlora.engine.preflight import check_engine_setup

    check_engine_setup(EngineConfig(model=config.model, tp=config.tp, comm_interface=config.comm_interface))


def bench(config: BenchConfig) -> int:
    """Run `bench` on this rank (all of it at TP 1, or one rank of a launch); rank 0 prints the table."""
    from trtllm_bdlora.llama.loader import load_base_model

    comm = init_ranks(config.tp, config.device, config.comm_interface, config.threads_per_rank, config.rank_timeout,
                      "bench")
    check_hosts_agree(comm, "bench", config)
    base = load_base_model(config.model)
    try:
        engine, pools = setup_schemes(comm, base, max_loras=config.max_loras, dtype=config.dtype,
                                      max_lora_rank=config.max_lora_rank, num_adapters=config.num_adapters,
                                      rank=config.rank, kv_cache_bytes=config.kv_cache_bytes,
                                      lora_kernel=config.lora_kernel)
        if comm.rank != 0:
            _follow(engine, pools)
        else:
            result = _lead(engine, pools, config, [1 + i % config.num_adapters for i in range(config.batch)])
        if comm.world > 1:  # every rank has its last broadcast before any tears the group down (a gloo abort seen once)
            import torch.distributed as dist

            dist.barrier()
    finally:
        shutdown(comm)
    if comm.rank != 0:
        return 0
    report = make_report(config, comm, result)
    print_report(report)
    if config.json:
        with open(config.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def setup_schemes(comm, base, *, max_loras: int, dtype: str, max_lora_rank: int | None, num_adapters: int, rank: int,
                  kv_cache_bytes: int | None = None, lora_kernel: str = "auto") -> tuple:
    """One engine (the shared model) and an adapter pool per scheme holding the same random BD adapters, with
    `comm.world` blocks."""
    from trtllm_bdlora.engine.adapter_pool import AdapterPool
    from trtllm_bdlora.engine.engine import DTYPES, Engine

    engine = Engine(comm, base, "bdlora", [], max_loras, dtype, max_lora_rank=max_lora_rank, kv_cache_bytes=kv_cache_bytes,
                    lora_kernel=lora_kernel)
    pools = {s: AdapterPool(engine.layout, comm.rank, "bdlora" if s == "none" else s, max_loras,
                            DTYPES[dtype], comm.device, engine.pool.max_lora_rank) for s in SCHEMES}
    for scheme in SCHEMES[1:]:
        for t in range(1, num_adapters + 1):
            pools[scheme].register(t, random_bd_adapter(engine.shape, rank, comm.world, seed=t))
    return engine, pools


def make_report(config: BenchConfig, comm, result: dict) -> dict:
    return {
        "model": config.model, "tp": config.tp, "batch": config.batch, "adapters": config.num_adapters,
        "rank": math.ceil(config.rank / config.tp) * config.tp, "prompt_len": config.prompt_len, "dtype": config.dtype,
        "device": comm.device.type, "threads_per_rank": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "schemes": {s: {**summarize(result["samples"][s]),
                        "lora_collectives": sum(v["count"] for v in result["collectives"][s].get("lora", {}).values()),
                        "base_collectives": sum(v["count"] for v in result["collectives"][s].get("base", {}).values())}
                    for s in SCHEMES},
    }


def print_report(report: dict) -> None:
    rows = report["schemes"]
    none = rows["none"]["median_ms"]
    print(f"model {report['model']}  tp {report['tp']}  batch {report['batch']}  adapters {report['adapters']}  "
          f"rank {report['rank']}  device {report['device']}  dtype {report['dtype']}  "
          f"threads/rank {report['threads_per_rank']}  steps {rows['none']['n']} per scheme, interleaved")
    print(f"{'scheme':<12}{'step ms':>9}{'p25-p75 ms':>16}{'min-max ms':>16}{'tokens/s':>10}{'vs no-LoRA':>11}"
          f"{'LoRA +%':>9}{'LoRA coll/step':>16}")
    for scheme, r in rows.items():
        ms = r["median_ms"]
        print(f"{scheme:<12}{ms:>9.2f}{r['p25_ms']:>8.1f}-{r['p75_ms']:<7.1f}{r['min_ms']:>8.1f}-{r['max_ms']:<7.1f}"
              f"{report['batch'] / ms * 1e3:>10.1f}{ms / none:>10.2f}x{100 * (ms / none - 1):>+8.1f}%{r['lora_collectives']:>16}")

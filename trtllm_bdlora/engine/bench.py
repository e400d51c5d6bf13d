"""`trtllm-bdlora bench`: decode step time for no LoRA vs bdlora vs slora vs replicated, same adapters."""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from trtllm_bdlora.adapters.lora import Adapter, LoraFactors
from trtllm_bdlora.engine.launch import init_ranks, mpi_world_size, relaunch_under_mpirun, shutdown
from trtllm_bdlora.models.shape import LLAMA_MODULES, LlamaShape, module_role


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


def _time_decode(engine, args, adapter_ids: list[int | None]) -> tuple[list[float], dict]:
    loads, slots = engine.pool.assign(adapter_ids)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.shape.vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in slots]
    engine.lead({"loads": loads, "chunks": [[i, p, 0, s] for i, (p, s) in enumerate(zip(prompts, slots))]})
    times, stats = [], {}
    for step in range(args.steps):
        chunks = [[i, [1], args.prompt_len + step, s] for i, s in enumerate(slots)]
        engine.comm.log.clear()
        t0 = time.perf_counter()
        engine.lead({"chunks": chunks})
        if engine.comm.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        stats = engine.comm.log.summary()
    engine.lead({"free": list(range(len(slots)))})
    return times[1:] or times, stats


def main(args: argparse.Namespace) -> int:
    if args.tp > 1 and mpi_world_size() is None:
        import sys

        from trtllm_bdlora.models.loader import resolve_model_dir

        resolve_model_dir(args.model)
        return relaunch_under_mpirun(args.tp, sys.argv[1:])
    from trtllm_bdlora.engine.engine import Engine
    from trtllm_bdlora.models.loader import load_base_model

    comm = init_ranks(args.tp, args.device)
    base = load_base_model(args.model)
    rows = []
    try:
        for scheme in ("none", "bdlora", "slora", "replicated"):
            engine = Engine(comm, base, "bdlora" if scheme == "none" else scheme, [], args.max_loras, args.dtype,
                            max_lora_rank=args.max_lora_rank)
            ids: list[int | None] = [None] * args.batch
            if scheme != "none":
                for t in range(1, args.num_adapters + 1):
                    engine.register(t, random_bd_adapter(engine.shape, args.rank, args.tp, seed=t))
                ids = [1 + i % args.num_adapters for i in range(args.batch)]
            if comm.rank != 0:
                engine.follow()
                continue
            times, stats = _time_decode(engine, args, ids)
            engine.lead(None)
            lora = sum(v["count"] for v in stats.get("lora", {}).values())
            rows.append((scheme, statistics.median(times) * 1e3, lora))
    finally:
        shutdown(comm)
    if comm.rank == 0:
        base_ms = rows[0][1]
        bd_ms = rows[1][1]
        print(f"model {args.model}  tp {args.tp}  batch {args.batch}  adapters {args.num_adapters}  "
              f"rank {args.rank}  device {comm.device.type}  dtype {args.dtype}")
        print(f"{'scheme':<12}{'step ms':>10}{'tokens/s':>12}{'vs no-LoRA':>12}{'vs bdlora':>11}{'LoRA coll/step':>16}")
        for scheme, ms, lora in rows:
            print(f"{scheme:<12}{ms:>10.2f}{args.batch / ms * 1e3:>12.1f}{ms / base_ms:>12.2f}x{ms / bd_ms:>10.2f}x{lora:>16}")
    return 0

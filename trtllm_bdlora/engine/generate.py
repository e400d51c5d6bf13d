"""`trtllm-bdlora generate`: JSON-lines requests in, one JSON line per request out, in input order."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from trtllm_bdlora.distributed.launch import init_ranks, mpi_world_size, shutdown
from trtllm_bdlora.errors import BdLoraError, RequestError


def _stats_summary(per_step: list[dict]) -> dict:
    def count(step, category):
        return sum(v["count"] for v in step.get(category, {}).values())

    return {
        "steps": len(per_step),
        "base_collectives": sum(count(s, "base") for s in per_step),
        "lora_collectives": sum(count(s, "lora") for s in per_step),
        "last_step": per_step[-1] if per_step else {},
    }


def run_requests(engine, lines, max_batch_size: int, stats: bool = False, max_num_tokens: int | None = None
                 ) -> list[dict]:
    """Rank 0: validate, schedule and run every request; returns the output objects in input order."""
    from trtllm_bdlora.engine.request import parse_request, read_request_lines
    from trtllm_bdlora.engine.scheduler import Scheduler

    scheduler = Scheduler(engine, max_batch_size, collect_stats=stats, max_num_tokens=max_num_tokens)
    results: list[dict | None] = []
    line_numbers: list[int] = []  # 1-based input line of each request (blank lines are skipped)
    numbered = (line_numbers.append(n) or line for n, line in enumerate(lines, 1) if line.strip())
    for index, obj, json_error in read_request_lines(numbered):
        try:
            if json_error:
                raise RequestError(json_error)
            req = parse_request(
                index, obj, engine.tokenizer, engine.shape.vocab_size, engine.max_seq_len, set(engine.pool.host)
            )
            scheduler.add(req)
            results.append(None)
        except RequestError as err:  # the request's own id, or null: never a number that could be another's id
            rid = obj.get("id") if isinstance(obj, dict) else None
            results.append({"id": rid, "line": line_numbers[index], "error": str(err)})
    while scheduler.busy:
        for req, per_step in scheduler.step():
            if req.error:
                results[req.index] = {"id": req.id, "line": line_numbers[req.index], "error": req.error}
                continue
            text = engine.tokenizer.decode(req.output_ids, skip_special_tokens=True) if engine.tokenizer else None
            out = {"id": req.id, "adapter": req.adapter, "output_ids": req.output_ids, "text": text}
            if stats:
                out["stats"] = _stats_summary(per_step)
            results[req.index] = out
    scheduler.flush()
    return results


def main(args: argparse.Namespace) -> int:
    if args.backend == "trtllm":
        raise BdLoraError("--backend trtllm serves built engines through Triton: see `trtllm-bdlora build` and docs/tensorrt-llm.md")
    if mpi_world_size() is None:
        from trtllm_bdlora.engine.engine import check_launch

        check_launch(args)  # before any rank starts
        if args.tp > 1:
            return _relaunch(args)
    from trtllm_bdlora.engine.engine import engine_from_args

    comm = init_ranks(args.tp, args.device, args.comm_interface)
    engine = engine_from_args(args, comm)
    try:
        if comm.rank != 0:
            engine.follow()
            return 0
        try:
            lines = sys.stdin if args.requests == "-" else open(args.requests)
        except OSError as err:
            raise BdLoraError(f"{args.requests}: {err.strerror}") from None
        with lines:
            results = run_requests(engine, lines, args.max_batch_size, args.stats, args.max_num_tokens)
        engine.lead(None)
        for out in results:
            print(json.dumps(out), flush=True)
        return 0
    finally:
        shutdown(comm)


def _relaunch(args: argparse.Namespace) -> int:
    """Re-run this command as `tp` ranks; stdin requests go through a temporary file."""
    from trtllm_bdlora.distributed.launcher import relaunch_ranks

    argv = sys.argv[1:]
    tmp = None
    if args.requests == "-":
        tmp = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
        tmp.write(sys.stdin.read())
        tmp.close()
        i = argv.index("--requests") if "--requests" in argv else None
        argv = argv[: i + 1] + [tmp.name] + argv[i + 2 :] if i is not None else [
            a if a != "--requests=-" else f"--requests={tmp.name}" for a in argv
        ]
    try:
        return relaunch_ranks(args.tp, argv, args.comm_interface)
    finally:
        if tmp:
            os.unlink(tmp.name)

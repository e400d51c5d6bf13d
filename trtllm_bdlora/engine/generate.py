"""`trtllm-bdlora generate`: JSON-lines requests in (`{"id", "adapter", "prompt" | "prompt_ids" | "messages",
"max_tokens", "temperature", "top_p", "seed"}`), one JSON line per request out, in input order: the JSON-lines
front end of the one request model (engine/request.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from trtllm_bdlora.config import GenerateConfig
from trtllm_bdlora.distributed.hosts import check_hosts_agree
from trtllm_bdlora.distributed.launch import init_ranks, shutdown
from trtllm_bdlora.engine.request import (
    MAX_SEED,
    Request,
    SamplingParams,
    build_request,
    chat_prompt_ids,
    check_number,
    text_prompt_ids,
)
from trtllm_bdlora.errors import BdLoraError, InputError, RequestError


def _stats_summary(per_step: list[dict]) -> dict:
    def count(step, category):
        return sum(v["count"] for v in step.get(category, {}).values())

    return {
        "steps": len(per_step),
        "base_collectives": sum(count(s, "base") for s in per_step),
        "lora_collectives": sum(count(s, "lora") for s in per_step),
        "last_step": per_step[-1] if per_step else {},
    }


def _field(obj: dict, key: str, default, kind, low=None, high=None, low_open=False):
    value = obj.get(key)
    return check_number(key, default if value is None else value, kind, low, high, low_open)


def parse_request(index: int, obj: Any, tokenizer, vocab_size: int, max_seq_len: int, adapters: set[int]) -> Request:
    """One JSON-lines request as a Request; raises RequestError with a one-line reason."""
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object")
    adapter = obj.get("adapter")
    if adapter is not None:
        if isinstance(adapter, bool) or not isinstance(adapter, int) or adapter < 1:
            raise InputError("adapter", f"must be a positive integer task id or null, got {adapter!r}")
        if adapter not in adapters:
            raise RequestError(f"unknown adapter {adapter} (register it with --adapter {adapter}=DIR)")
    sources = [k for k in ("prompt", "prompt_ids", "messages") if obj.get(k) is not None]
    if len(sources) != 1:
        raise RequestError("give exactly one of prompt, prompt_ids, messages")
    if sources[0] == "prompt_ids":
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError("prompt_ids", "must be a list of integers")
    elif sources[0] == "prompt":
        ids = text_prompt_ids(tokenizer, obj["prompt"], max_seq_len)
    else:
        ids = chat_prompt_ids(tokenizer, obj["messages"])
    params = SamplingParams(
        max_tokens=_field(obj, "max_tokens", 16, int, low=1),
        temperature=_field(obj, "temperature", 0.0, float, low=0.0),
        top_p=_field(obj, "top_p", 1.0, float, low=0.0, high=1.0, low_open=True),
        seed=_field(obj, "seed", 0, int, low=0, high=MAX_SEED),
    )
    return build_request(ids, params, vocab_size=vocab_size, max_seq_len=max_seq_len, adapter=adapter,
                         id=obj.get("id", index), index=index)


def read_request_lines(lines) -> list[tuple[int, Any, str | None]]:
    """(index, parsed object or None, JSON error) per non-blank line."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            out.append((len(out), json.loads(line), None))
        except json.JSONDecodeError as err:
            out.append((len(out), None, f"invalid JSON ({err.msg} at column {err.colno})"))
    return out


def run_requests(engine, lines, max_batch_size: int, stats: bool = False, max_num_tokens: int | None = None
                 ) -> list[dict]:
    """Rank 0: validate, schedule and run every request; returns the output objects in input order."""
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
                results[req.index] = {"id": req.id, "line": line_numbers[req.index], "error": str(req.error)}
                continue
            text = engine.tokenizer.decode(req.output_ids, skip_special_tokens=True) if engine.tokenizer else None
            out = {"id": req.id, "adapter": req.adapter, "output_ids": req.output_ids, "text": text}
            if stats:
                out["stats"] = _stats_summary(per_step)
            results[req.index] = out
    scheduler.flush()
    return results


def preflight(config: GenerateConfig) -> None:
    """Everything that can be refused before any rank starts, as one line naming the flag."""
    from trtllm_bdlora.engine.preflight import check_adapters, check_engine_setup

    if config.engine.backend == "trtllm":
        raise BdLoraError("--backend trtllm serves built engines through Triton: see `trtllm-bdlora build` and "
                          "docs/tensorrt-llm.md")
    requests = Path(config.requests)
    if config.requests != "-" and (not requests.exists() or requests.is_dir() or not os.access(requests, os.R_OK)):
        why = "a directory" if requests.is_dir() else "not readable" if requests.exists() else "no such file"
        raise BdLoraError(f"--requests {config.requests}: {why}")
    check_engine_setup(config.engine)
    check_adapters(config.engine)


def generate(config: GenerateConfig) -> int:
    """Run `generate` on this rank (all of it at TP 1, or one rank of a launch): rank 0 reads the requests and
    writes one JSON line per request to stdout, in input order."""
    from trtllm_bdlora.engine.engine import engine_from_config

    if config.engine.backend == "trtllm":
        raise BdLoraError("--backend trtllm serves built engines through Triton: see `trtllm-bdlora build` and "
                          "docs/tensorrt-llm.md")
    engine_config = config.engine
    comm = init_ranks(engine_config.tp, engine_config.device, engine_config.comm_interface, engine_config.threads_per_rank,
                      engine_config.rank_timeout, "generate")
    check_hosts_agree(comm, "generate", engine_config)
    engine = engine_from_config(engine_config, comm)
    try:
        if comm.rank != 0:
            engine.follow()
            return 0
        try:
            lines = sys.stdin if config.requests == "-" else open(config.requests)
        except OSError as err:
            raise BdLoraError(f"--requests {config.requests}: {err.strerror}") from None
        with lines:
            results = run_requests(engine, lines, engine_config.max_batch_size, config.stats, engine_config.max_num_tokens)
        engine.lead(None)
        for out in results:
            print(json.dumps(out), flush=True)
        return 0
    finally:
        shutdown(comm)

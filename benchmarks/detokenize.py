"""The OpenAI layer's text of a growing output, per token, against the output's length: `TextTracker` (incremental)
beside decoding the whole output at every token (what it did before, and the definition its tests check it
against). The tokens are the embedded model's tokenization of the Python Language Reference (`pydoc_data`), one
stop string that never matches, as a request with `stop` set.

  python benchmarks/detokenize.py --lengths 256 1024 4096
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class WholeDecode:
    """The definition: the whole list decoded at each token, and the stop strings searched in all of it."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops, self.ids = decode, stops, []

    def add(self, token: int) -> bool:
        self.ids.append(token)
        text = self.decode(self.ids)
        return any(text.find(s) >= 0 for s in self.stops)


def per_token_us(make, ids: list[int], last: int) -> tuple[float, float]:
    """(µs per token over the whole output, µs per token over its `last` tokens)."""
    tracker = make()
    start = time.perf_counter()
    for token in ids[:-last]:
        tracker.add(token)
    middle = time.perf_counter()
    for token in ids[-last:]:
        tracker.add(token)
    end = time.perf_counter()
    return (end - start) / len(ids) * 1e6, (end - middle) / last * 1e6


def main(argv: list[str] | None = None) -> int:
    import pydoc_data.topics

    from transformers import AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir
    from trtllm_bdlora.serving.openai.protocol import TextTracker

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="output lengths in tokens")
    p.add_argument("--last", type=int, default=64, help="tokens at the end whose cost is reported apart")
    args = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    corpus = tokenizer.encode(" ".join(pydoc_data.topics.topics.values()))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    stops = ["<|never|>"]
    print("| output tokens | whole decode: µs/token (at the end) | incremental | whole / incremental at the end |")
    print("|---|---|---|---|")
    for n in args.lengths:
        ids, last = corpus[:n], min(args.last, n // 2)
        whole = per_token_us(lambda: WholeDecode(decode, stops), ids, last)
        incremental = per_token_us(lambda: TextTracker(decode, stops), ids, last)
        print(f"| {n} | {whole[0]:.1f} ({whole[1]:.1f}) | {incremental[0]:.1f} ({incremental[1]:.1f}) | "
              f"{whole[1] / incremental[1]:.0f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

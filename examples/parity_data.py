"""The two parity tasks, both offline and seeded.

- `lm`: language modelling on the Python Language Reference, the text `pydoc_data.topics` ships inside every
  CPython (PSF License). Documents are split whole (every 5th held out), so held-out text is never trained on;
  the score is held-out perplexity.
- `add`: 3-digit addition written as `347+589=` -> `936`, scored by exact match of the first output line; the
  base model scores ~0 and a LoRA trained briefly on CPU lands far from both ends.
"""

from __future__ import annotations

import random
import sys

HELDOUT_EVERY = 5


def corpus_documents() -> list[tuple[str, str]]:
    """(topic, text) pairs of the Python reference text this interpreter ships, in a fixed order."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def corpus_name() -> str:
    return f"pydoc_data.topics of CPython {sys.version.split()[0]} (the Python Language Reference, PSF License)"


def lm_windows(tokenizer, split: str, length: int, limit: int | None = None) -> list[list[int]]:
    """Token windows of `length` from the documents of `split` ("train" or "heldout"), EOS between documents."""
    docs = [text for i, (_, text) in enumerate(corpus_documents()) if (i % HELDOUT_EVERY == 0) == (split == "heldout")]
    stream: list[int] = []
    for text in docs:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
    return windows[:limit]


def addition_examples(split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, answer) pairs; `train` never contains a held-out pair."""
    rng = random.Random(f"add-{split}-{seed}")
    excluded = {p for p, _ in addition_examples("heldout", 1000)} if split == "train" else set()
    out, seen = [], set()
    while len(out) < n:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        prompt = f"{a}+{b}="
        if prompt in seen or prompt in excluded:
            continue
        seen.add(prompt)
        out.append((prompt, str(a + b)))
    return out


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0].strip() if stripped else ""

"""Three tasks whose answers are checked exactly, which the base model fails: generated, seeded, with a
held-out split that shares no example with training; and the two forms a request can take."""

from __future__ import annotations

import json
import random

WORDS = (
    "apple river stone cloud green tiger lemon piano candle forest silver rocket garden window yellow "
    "orange planet button mirror castle dragon winter summer violet copper bridge pencil coffee marble "
    "rabbit jungle falcon harbor meadow pepper saddle thunder velvet walnut anchor basket cactus desert "
    "engine feather glacier hammer island jacket kettle ladder magnet needle office parrot quartz ribbon"
).split()

TASKS = ("upper", "reverse", "json")
FORMS = ("chat", "plain")  # `messages` through the chat template (chat endpoints), or a plain `prompt` (serve + client)
PLAIN_SEPARATOR = "\n"  # a plain prompt is completed as PROMPT + "\n" + ANSWER


def _example(task: str, rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    if task == "upper":
        text = " ".join(words)
        return f"Rewrite in upper case: {text}", text.upper()
    if task == "reverse":
        return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))
    if task == "json":
        n = rng.randint(2, 99)
        item = rng.choice(words)
        return f"I counted {n} {item}s. Report the count.", json.dumps({"item": item, "count": n})
    raise ValueError(f"unknown task {task!r}")


def examples(task: str, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(user prompt, exact answer) pairs; `train` and `heldout` never share a prompt."""
    rng = random.Random(f"{task}-{split}-{seed}")
    seen_other = set()
    if split == "train":
        seen_other = {p for p, _ in examples(task, "heldout", 200, seed)}
    out, seen = [], set()
    while len(out) < n:
        prompt, answer = _example(task, rng)
        if prompt in seen or prompt in seen_other:
            continue
        seen.add(prompt)
        out.append((prompt, answer))
    return out


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def request_input(prompt: str, form: str) -> dict:
    """The prompt part of a `generate` request in `form`."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}")
    return {"messages": messages(prompt)} if form == "chat" else {"prompt": prompt}


def input_ids(tokenizer, request: dict) -> list[int]:
    """The token ids `generate` (and `serve`) feed the model for a `messages` or `prompt` request."""
    if "messages" in request:
        text = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(request["prompt"])["input_ids"]

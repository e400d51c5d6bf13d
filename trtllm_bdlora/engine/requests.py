"""Generation requests: the JSON-lines contract of `generate` (DESIGN section 5) and its validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trtllm_bdlora.errors import RequestError


@dataclass
class Request:
    index: int
    id: Any
    adapter: int | None
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    output_ids: list[int] = field(default_factory=list)
    on_token: Callable[[int], bool | None] | None = None  # called on rank 0 after every sampled token; True ends it


def _number(obj: dict, key: str, default, kind, low=None, high=None, low_open=False):
    value = obj.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise RequestError(f"{key} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise RequestError(f"{key} must be <= {high}, got {value}")
    return kind(value)


def _chat_ids(tokenizer, messages) -> list[int]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise RequestError("messages must be a list of {role, content} objects")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # the template's own complaint, whatever its type
        raise RequestError(f"messages: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def parse_request(
    index: int, obj: Any, tokenizer, vocab_size: int, max_seq_len: int, adapters: set[int]
) -> Request:
    """Validate one request object; raises RequestError with a one-line reason."""
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object")
    adapter = obj.get("adapter")
    if adapter is not None:
        if isinstance(adapter, bool) or not isinstance(adapter, int) or adapter < 1:
            raise RequestError(f"adapter must be a positive integer task id or null, got {adapter!r}")
        if adapter not in adapters:
            raise RequestError(f"unknown adapter {adapter} (register it with --adapter {adapter}=DIR)")
    sources = [k for k in ("prompt", "prompt_ids", "messages") if obj.get(k) is not None]
    if len(sources) != 1:
        raise RequestError("give exactly one of prompt, prompt_ids, messages")
    if sources[0] == "prompt_ids":
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("prompt_ids must be a list of integers")
        if any(t < 0 or t >= vocab_size for t in ids):
            raise RequestError(f"prompt_ids must lie in [0, {vocab_size})")
    else:
        if tokenizer is None:
            raise RequestError("this model has no tokenizer: send prompt_ids")
        if sources[0] == "prompt":
            if not isinstance(obj["prompt"], str):
                raise RequestError("prompt must be a string")
            ids = tokenizer(obj["prompt"])["input_ids"] if obj["prompt"] else []
        else:
            ids = _chat_ids(tokenizer, obj["messages"])
    if not ids:
        raise RequestError("empty prompt")
    max_tokens = _number(obj, "max_tokens", 16, int, low=1)
    if len(ids) >= max_seq_len:
        raise RequestError(f"prompt of {len(ids)} tokens does not fit the context of {max_seq_len}")
    if len(ids) + max_tokens > max_seq_len:
        raise RequestError(
            f"max_tokens {max_tokens} with a {len(ids)}-token prompt exceeds the context of {max_seq_len}"
        )
    return Request(
        index=index,
        id=obj.get("id", index),
        adapter=adapter,
        prompt_ids=list(ids),
        max_tokens=max_tokens,
        temperature=_number(obj, "temperature", 0.0, float, low=0.0),
        top_p=_number(obj, "top_p", 1.0, float, low=0.0, high=1.0, low_open=True),
        seed=_number(obj, "seed", 0, int, low=0),
    )


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

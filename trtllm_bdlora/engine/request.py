"""Generation requests: the JSON-lines contract of `generate` (DESIGN section 5), the sampling values every
front end validates the same way, and what the scheduler records while a request runs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trtllm_bdlora.errors import RequestError

MAX_SEED = 2**64 - 1


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
    # TensorRT-LLM's sampling controls (executor SamplingConfig); the defaults change nothing.
    top_k: int | None = None  # None: greedy when temperature is 0 (generate's rule); 1: greedy; 0: no top-k cut
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    end_ids: frozenset[int] | None = None  # None: the model's EOS ids; empty: never stop on a token
    stop_words: tuple[tuple[int, ...], ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()
    embedding_bias: Any = None  # torch tensor [vocab] added to the logits, or None
    return_log_probs: bool = False
    normalize_log_probs: bool = True
    return_context_logits: bool = False
    return_generation_logits: bool = False
    # filled while the request runs (on rank 0)
    output_ids: list[int] = field(default_factory=list)
    output_log_probs: list[float] = field(default_factory=list)
    context_logits: Any = None  # [prompt tokens, vocab] when return_context_logits
    generation_logits: list = field(default_factory=list)  # one [vocab] row per generated token
    finish_reason: str | None = None  # "length" | "end_id" | "stop_words" | "cancelled" | "error"
    error: str | None = None  # one line, when serving this request failed (finish_reason "error")
    times_ns: dict[str, int] = field(default_factory=dict)  # arrival, first_scheduled, first_token, last_token
    cancelled: bool = False
    client_gone: Callable[[], bool] | None = None  # polled before every step: the client cancelled or left
    on_token: Callable[[int], None] | None = None  # called on rank 0 after every sampled token; may cancel

    @property
    def abandoned(self) -> bool:
        """Cancelled, or nobody will read the result (disconnect, deadline): leave the batch now."""
        return self.cancelled or (self.client_gone is not None and self.client_gone())

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 if self.top_k is not None else self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def check_number(name: str, value, kind=float, low=None, high=None, low_open: bool = False):
    """One sampling value: a finite number of the right kind inside its range, else a one-line RequestError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise RequestError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise RequestError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise RequestError(f"{name} must be <= {high}, got {value}")
    return kind(value)


def check_penalties(repetition: float, presence: float, frequency: float, min_tokens: int) -> None:
    """TensorRT-LLM's ranges (executor SamplingConfig): repetition_penalty > 0, min_tokens >= 0."""
    check_number("repetition_penalty", repetition, low=0.0, low_open=True)
    check_number("presence_penalty", presence)
    check_number("frequency_penalty", frequency)
    check_number("min_tokens", min_tokens, int, low=0)


def check_length(prompt_len: int, max_tokens: int, max_seq_len: int, name: str = "max_tokens") -> None:
    """The prompt and every token asked for must fit the model's context (checked before the request runs)."""
    if prompt_len == 0:
        raise RequestError("empty prompt")
    if prompt_len >= max_seq_len:
        raise RequestError(f"prompt of {prompt_len} tokens does not fit the context of {max_seq_len} tokens "
                           "(no room for one output token)")
    if prompt_len + max_tokens > max_seq_len:
        raise RequestError(f"{name} {max_tokens} with a {prompt_len}-token prompt ({prompt_len + max_tokens} tokens) "
                           f"exceeds the context of {max_seq_len}")


def longest_token_bytes(tokenizer) -> int:
    """An upper bound on the bytes of text one token stands for: the longest vocabulary entry in UTF-8 (byte-level
    BPE spells each byte as one character of at most 2 bytes; SentencePiece's "\u2581" is 3 bytes for a space)."""
    return max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=1) or 1


def max_text_bytes(tokenizer, max_seq_len: int) -> int:
    """Texts longer than this cannot fit the context whatever they say: refuse them before tokenizing."""
    return max_seq_len * longest_token_bytes(tokenizer)


def check_text_bytes(name: str, nbytes: int, limit: int, max_seq_len: int) -> None:
    """A prompt's size against `max_text_bytes`, before any tokenizer sees it."""
    if nbytes > limit:
        raise RequestError(f"{name} of {nbytes} bytes cannot fit the context of {max_seq_len} tokens "
                           f"(at most {limit} bytes of text); refused before tokenizing")


def check_token_ids(name: str, ids, vocab_size: int) -> list[int]:
    if any(t < 0 or t >= vocab_size for t in ids):
        raise RequestError(f"{name} must lie in [0, {vocab_size})")
    return [int(t) for t in ids]


def _number(obj: dict, key: str, default, kind, low=None, high=None, low_open=False):
    value = obj.get(key, default)
    return check_number(key, default if value is None else value, kind, low, high, low_open)


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
        ids = check_token_ids("prompt_ids", ids, vocab_size)
    else:
        if tokenizer is None:
            raise RequestError("this model has no tokenizer: send prompt_ids")
        if sources[0] == "prompt":
            if not isinstance(obj["prompt"], str):
                raise RequestError("prompt must be a string")
            check_text_bytes("prompt", len(obj["prompt"].encode("utf-8", "surrogatepass")),
                             max_text_bytes(tokenizer, max_seq_len), max_seq_len)
            ids = tokenizer(obj["prompt"])["input_ids"] if obj["prompt"] else []
        else:
            ids = _chat_ids(tokenizer, obj["messages"])
    max_tokens = _number(obj, "max_tokens", 16, int, low=1)
    check_length(len(ids), max_tokens, max_seq_len)
    return Request(
        index=index,
        id=obj.get("id", index),
        adapter=adapter,
        prompt_ids=list(ids),
        max_tokens=max_tokens,
        temperature=_number(obj, "temperature", 0.0, float, low=0.0),
        top_p=_number(obj, "top_p", 1.0, float, low=0.0, high=1.0, low_open=True),
        seed=_number(obj, "seed", 0, int, low=0, high=MAX_SEED),
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

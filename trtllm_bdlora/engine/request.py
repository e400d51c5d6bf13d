"""The one request model: `SamplingParams` (every sampling value any front end can set, TensorRT-LLM's executor
SamplingConfig and OutputConfig semantics), `Request` (a prompt, an adapter, its parameters, and what the scheduler
records while it runs), and `build_request`, the one builder every front end (JSON-lines `generate`, the OpenAI API,
the `tensorrt_llm` model, the production Python models) calls after mapping its own field names onto these. Checks
raise one-line errors that name the field as the front end's client spelled it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trtllm_bdlora.engine.guided import Guide
from trtllm_bdlora.engine.logprobs import MAX_LOGPROBS, TokenLogprobs
from trtllm_bdlora.errors import BdLoraError, InputError, RequestError

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None  # None: greedy when temperature is 0 (generate's rule); 1: greedy; 0: no top-k cut
    seed: int = 0
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
    logprobs: int | None = None  # per generated token: its raw log-prob and the top-k (engine/logprobs.py); None: off
    prompt_logprobs: int | None = None  # per prompt token (vLLM's prompt_logprobs), the top-k; None: off
    guide: Guide | None = None  # guided decoding: the output matches this grammar (engine/guided.py)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 if self.top_k is not None else self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def check(self, names: Mapping[str, str] = {}) -> None:  # noqa: B006 (read only)
        """Every value in its range (TensorRT-LLM's, executor SamplingConfig), else an InputError naming the field
        as `names` spells it for the front end."""
        def number(key, kind=float, low=None, high=None, low_open=False):
            check_number(names.get(key, key), getattr(self, key), kind, low, high, low_open)

        number("max_tokens", int, low=1)
        number("temperature", low=0.0)
        number("top_p", low=0.0, high=1.0, low_open=True)
        if self.top_k is not None:
            number("top_k", int, low=0)
        number("seed", int, low=0, high=MAX_SEED)
        number("repetition_penalty", low=0.0, low_open=True)
        number("presence_penalty")
        number("frequency_penalty")
        number("min_tokens", int, low=0)
        for key in ("logprobs", "prompt_logprobs"):
            if getattr(self, key) is not None:
                number(key, int, low=0, high=MAX_LOGPROBS)


@dataclass
class Request:
    index: int
    id: Any
    adapter: int | None
    prompt_ids: list[int]
    params: SamplingParams
    # filled while the request runs (on rank 0)
    output_ids: list[int] = field(default_factory=list)
    output_log_probs: list[float] = field(default_factory=list)
    context_logits: Any = None  # [prompt tokens, vocab] when return_context_logits
    generation_logits: list = field(default_factory=list)  # one [vocab] row per generated token
    output_token_logprobs: list[TokenLogprobs] = field(default_factory=list)  # when params.logprobs is set
    prompt_token_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt positions 1.., params.prompt_logprobs
    guide_matcher: Any = None  # params.guide's matcher (guided.attach_guide), advanced on rank 0
    finish_reason: str | None = None  # "length" | "end_id" | "stop_words" | "guide_done" | "cancelled" | "error"
    error: BdLoraError | None = None  # when serving this request failed (finish_reason "error")
    times_ns: dict[str, int] = field(default_factory=dict)  # arrival, first_scheduled, first_token, last_token
    cancelled: bool = False
    cancel_reason: str = "cancelled"  # the finish_reason of a cancel or a departed client (Runtime.cancel sets it)
    client_gone: Callable[[], bool] | None = None  # polled before every step: the client cancelled or left
    on_token: Callable[[int], None] | None = None  # called on rank 0 after every sampled token; may cancel

    @property
    def abandoned(self) -> bool:
        """Cancelled, or nobody will read the result (disconnect, deadline): leave the batch now."""
        return self.cancelled or (self.client_gone is not None and self.client_gone())


def build_request(prompt_ids: list[int], params: SamplingParams, *, vocab_size: int, max_seq_len: int,
                  adapter: int | None = None, id: Any = None, index: int = 0,
                  names: Mapping[str, str] = {}) -> Request:  # noqa: B006 (read only)
    """The one way to make a Request: the prompt's ids in the vocabulary, the parameters in range, prompt and
    output within the context. `names` maps SamplingParams fields (and "prompt_ids") to the front end's names."""
    ids = check_token_ids(names.get("prompt_ids", "prompt_ids"), prompt_ids, vocab_size)
    params.check(names)
    check_length(len(ids), params.max_tokens, max_seq_len, names.get("max_tokens", "max_tokens"))
    return Request(index=index, id=id, adapter=adapter, prompt_ids=ids, params=params)


def check_number(name: str, value, kind=float, low=None, high=None, low_open: bool = False):
    """One value: a finite number of the right kind inside its range, else a one-line InputError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InputError(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise InputError(name, f"must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(name, f"must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise InputError(name, f"must be <= {high}, got {value}")
    return kind(value)


def check_length(prompt_len: int, max_tokens: int, max_seq_len: int, name: str = "max_tokens") -> None:
    """The prompt and every token asked for must fit the model's context (checked before the request runs)."""
    if prompt_len == 0:
        raise RequestError("empty prompt")
    if prompt_len >= max_seq_len:
        raise RequestError(f"prompt of {prompt_len} tokens does not fit the context of {max_seq_len} tokens "
                           "(no room for one output token)")
    if prompt_len + max_tokens > max_seq_len:
        raise InputError(name, f"{max_tokens} with a {prompt_len}-token prompt ({prompt_len + max_tokens} tokens) "
                               f"exceeds the context of {max_seq_len}")


def longest_token_bytes(tokenizer) -> int:
    """An upper bound on the bytes of text one token stands for: the longest vocabulary entry in UTF-8 (byte-level
    BPE spells each byte as one character of at most 2 bytes; SentencePiece's "\u2581" is 3 bytes for a space).
    Computed once per tokenizer."""
    cached = getattr(tokenizer, "_bdlora_longest_token_bytes", None)
    if cached is None:
        cached = max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=1) or 1
        try:
            tokenizer._bdlora_longest_token_bytes = cached
        except AttributeError:
            pass
    return cached


def max_text_bytes(tokenizer, max_seq_len: int) -> int:
    """Texts longer than this cannot fit the context whatever they say: refuse them before tokenizing."""
    return max_seq_len * longest_token_bytes(tokenizer)


def check_text_bytes(name: str, nbytes: int, limit: int, max_seq_len: int) -> None:
    """A prompt's size against `max_text_bytes`, before any tokenizer sees it."""
    if nbytes > limit:
        raise RequestError(f"{name} of {nbytes} bytes cannot fit the context of {max_seq_len} tokens "
                           f"(at most {limit} bytes of text); refused before tokenizing", param=name)


def check_token_ids(name: str, ids, vocab_size: int) -> list[int]:
    ids = [int(t) for t in ids]
    if any(t < 0 or t >= vocab_size for t in ids):
        raise InputError(name, f"must lie in [0, {vocab_size})")
    return ids


def text_prompt_ids(tokenizer, text: str, max_seq_len: int, name: str = "prompt") -> list[int]:
    """A text prompt's ids (the tokenizer's special tokens added); texts that cannot fit are refused unread."""
    if tokenizer is None:
        raise RequestError("this model has no tokenizer: send token ids")
    if not isinstance(text, str):
        raise InputError(name, "must be a string")
    check_text_bytes(name, len(text.encode("utf-8", "surrogatepass")), max_text_bytes(tokenizer, max_seq_len), max_seq_len)
    return tokenizer(text)["input_ids"] if text else []


def text_bytes(value) -> int:
    """UTF-8 bytes of every string in `value` (strings, and lists and dicts of them, keys included)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += item
    return total


def chat_prompt_ids(tokenizer, messages, name: str = "messages", max_seq_len: int | None = None) -> list[int]:
    """The ids of `messages` through the tokenizer's chat template, with the generation prompt. With `max_seq_len`,
    messages whose text alone cannot fit the context are refused before the template sees them."""
    if tokenizer is None:
        raise RequestError("this model has no tokenizer: send token ids")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise InputError(name, "must be a list of {role, content} objects")
    if max_seq_len is not None:
        check_text_bytes(name, text_bytes(messages), max_text_bytes(tokenizer, max_seq_len), max_seq_len)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # the template's own complaint (a jinja TemplateError raised by the template itself)
        first = str(err).splitlines()[0] if str(err) else ""
        raise RequestError(f"{name}: the chat template refused them" + (f": {first}" if first else "")) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]

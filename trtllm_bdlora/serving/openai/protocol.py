"""OpenAI request bodies, response objects and errors, in the shapes vLLM's OpenAI server gives them
(vllm/entrypoints/openai/engine/protocol.py: ErrorResponse, ModelCard, UsageInfo; completion/protocol.py and
chat_completion/protocol.py: responses and stream chunks; serve/utils/error_response.py: error types), read
2026-11-23. Extensions kept from vLLM: `return_token_ids`, `stop_reason`, `max_model_len` on model cards, and the
sampling fields `top_k`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids` (served, like OpenAI's
penalties, with TensorRT-LLM's semantics: engine/sampler.py).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from trtllm_bdlora.engine.guided import Guide, json_schema_text
from trtllm_bdlora.engine.request import (
    MAX_SEED,
    SamplingParams,
    chat_prompt_ids,
    check_number,
    check_token_ids,
    text_prompt_ids,
)
from trtllm_bdlora.errors import BdLoraError, InputError, RequestError, public_text

# Fields this server cannot honour, with the values that mean "off": anything else is a 400 naming the field.
UNSUPPORTED = {
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}), "min_p": (None, 0),
    "use_beam_search": (None, False), "tools": (None, []), "functions": (None, []),
    # vLLM's extensions a client may send that this server does not implement
    "truncate_prompt_tokens": (None,), "allowed_token_ids": (None, []), "bad_words": (None, []),
    "logprob_token_ids": (None, []), "skip_special_tokens": (None, True),
    "structured_outputs": (None,), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "priority": (None, 0),
}
MAX_STOPS = 4
MAX_CHOICES = 64  # n times the number of prompts, per request


def error_body(err: BdLoraError) -> dict:
    """An error as OpenAI answers it: `{"error": {"message", "type", "param", "code"}}`, status and type from the one
    table of errors.py."""
    status = err.status
    return {"error": {"message": public_text(str(err)), "type": status.openai_type, "param": err.param,
                      "code": status.http}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False


class LoRARequest(BaseModel):
    """trtllm-serve's `lora_request` body field: the adapter a request runs with, by id or name, loaded from
    `lora_path` (under --adapter-root, with --allow-adapter-loading) when not yet registered."""

    model_config = ConfigDict(extra="allow")
    lora_name: str = ""
    lora_int_id: int | None = None
    lora_path: str = ""


class SamplingRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = False
    # vLLM's extensions, served with TensorRT-LLM's semantics (engine/sampler.py)
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    prompt_logprobs: int | None = None
    response_format: dict | None = None
    tool_choice: Any = None
    lora_request: LoRARequest | None = None
    unsupported: ClassVar[dict] = {}  # this endpoint's own fields it cannot honour (subclasses)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise RequestError(f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
        return stops

    def check_supported(self) -> None:
        check_number("n", self.n if self.n is not None else 1, int, low=1, high=MAX_CHOICES)
        for key, value in (self.model_extra or {}).items():
            if key in UNSUPPORTED and value not in UNSUPPORTED[key]:
                raise RequestError(f"{key}={value!r} is not supported by this server", param=key)
        for key, off in self.unsupported.items():
            if getattr(self, key, None) not in off:
                raise RequestError(f"{key}={getattr(self, key)!r} is not supported by this server", param=key)
        if self.tool_choice not in (None, "none"):  # as vLLM; and no tools can be given here
            raise RequestError("When using `tool_choice`, `tools` must be set.", param="tool_choice")

    @property
    def choices(self) -> int:
        return 1 if self.n is None else self.n

    def logprob_count(self) -> int | None:
        """Top log-probs per generated token (None: no log-probs); the endpoints spell it differently."""
        return None

    def prompt_top_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def guide(self) -> Guide | None:
        """`response_format` as a guide for guided decoding (engine/guided.py); None for text."""
        fmt = self.response_format
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return Guide("json_object")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise InputError("response_format", "json_schema needs {\"json_schema\": {\"name\", \"schema\"}}")
            return Guide("json_schema", json_schema_text(spec["schema"], "response_format.json_schema.schema"))
        raise InputError("response_format", f"type must be text, json_object or json_schema, got {kind!r}")

    def _choice_seed(self, choice: int) -> int:
        """Choice 0 samples with `seed`, choice i > 0 with a seed of its own derived from it."""
        seed = check_number("seed", self.seed, int, low=0, high=MAX_SEED)
        return (seed + choice * 0x9E3779B97F4A7C15) % (MAX_SEED + 1)

    def sampling_params(self, max_tokens: int, vocab_size: int, choice: int = 0) -> SamplingParams:
        """These fields on the one request model (engine/request.py), with OpenAI's defaults and vLLM's extensions:
        -1 and 0 turn top_k off; temperature 0 stays greedy whatever top_k says; penalties in OpenAI's range
        [-2, 2]; an unset seed is drawn at random; choice i of n > 1 samples with its own seed."""
        top_k = None
        if self.top_k is not None and self.temperature != 0:
            top_k = 0 if self.top_k == -1 else check_number("top_k", self.top_k, int, low=0)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low=-2.0, high=2.0)
        stop_words = ()
        if self.stop_token_ids:  # as vLLM: the stop token is the last output token
            stop_words = tuple((t,) for t in check_token_ids("stop_token_ids", self.stop_token_ids, vocab_size))
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=top_k,
            seed=random.getrandbits(63) if self.seed is None else self._choice_seed(choice),
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            min_tokens=self.min_tokens or 0, end_ids=frozenset() if self.ignore_eos else None, stop_words=stop_words,
            logprobs=self.logprob_count(), prompt_logprobs=self.prompt_top_logprobs(), guide=self.guide())


# the request model's names (engine/request.py) for these clients' fields
FIELD_NAMES = {"prompt_ids": "prompt"}


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_top_logprobs(self) -> int | None:
        """vLLM: echo with logprobs returns the prompt's log-probs too, with as many top entries."""
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs

    def prompts(self, tokenizer, max_seq_len: int) -> list[tuple[list[int], str | None]]:
        """(token ids, text or None) of each prompt: a string, a list of token ids, or a list of either."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not prompt:
            raise InputError("prompt", "must not be empty")
        if len(prompt) * self.choices > MAX_CHOICES:
            raise InputError("prompt", f"{len(prompt)} prompts with n={self.choices} make more than {MAX_CHOICES} choices")
        out = []
        for i, one in enumerate(prompt):
            name = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
            if isinstance(one, str):
                out.append((text_prompt_ids(tokenizer, one, max_seq_len, name), one))
            else:
                out.append((list(one), None))
        return out


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    echo: bool | None = False
    unsupported: ClassVar[dict] = {"echo": (None, False)}

    def logprob_count(self) -> int | None:
        count = self.top_logprobs
        if not self.logprobs:
            if count not in (None, 0):
                raise InputError("top_logprobs", "needs logprobs: true")
            return None
        return 0 if count is None else count

    def prompts(self, tokenizer, max_seq_len: int) -> list[tuple[list[int], str | None]]:
        return [(chat_prompt_ids(tokenizer, self.chat_messages(), max_seq_len=max_seq_len), None)]

    def chat_messages(self) -> list[dict]:
        """Messages for the tokenizer's chat template, text content parts joined into one string."""
        out = []
        for m in self.messages:
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise RequestError("only text content parts are supported", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(m.get("role"), str) or not isinstance(content, (str, type(None))):
                raise RequestError("each message needs a string role and string or text-part content", param="messages")
            out.append(dict(m, content=content or ""))
        return out


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


class TextTracker:
    """The text of a growing token list, cut before the first stop string (after it with vLLM's
    `include_stop_str_in_output`). Decoded incrementally, as vLLM and TGI do: each token decodes only a short window
    (the tokens since the last complete character, after a few tokens of context), so a token costs the same at any
    output length. `text` always equals the whole list decoded (with a trailing U+FFFD while a character is
    incomplete); where a window does not extend its context's text, the whole list is decoded once instead.
    `final_text` is what a finished output reports."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], include_stop: bool = False):
        self.decode, self.stops, self.include_stop = decode, stops, include_stop
        self.ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self._head = ""  # the text of ids[:_read], complete characters only
        self._context = self._read = 0  # the window: ids[_context:], of which ids[_context:_read] is context
        self._context_text = ""
        self._longest_stop = max((len(s) for s in stops), default=0)

    @property
    def holdback(self) -> int:
        """Characters a stream must hold back: they may begin a stop string that is cut off."""
        return 0 if self.include_stop else max(self._longest_stop, 1) - 1

    @property
    def final_text(self) -> str:
        """The text without the U+FFFD of a character the output ended inside (max_tokens reached mid-character), as
        vLLM's detokenisers never emit incomplete bytes. Only the tokens after the last complete character can end
        inside one: text already committed, and text cut at a stop string, are kept as they are."""
        if self.stop_reason is not None:
            return self.text
        return self.text[: max(len(self._head), len(self.text.rstrip("\ufffd")))]

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string completed (the text then ends before it, or with it)."""
        self.ids.append(token)
        searched = max(0, len(self._head) - self._longest_stop + 1)  # no stop string lies wholly in the head
        window = self.decode(self.ids[self._context:])
        if window.startswith(self._context_text):
            text = self._head + window[len(self._context_text):]
        else:
            text, searched = self.decode(self.ids), 0
        if len(text) > len(self._head) and not text.endswith("\ufffd"):
            self._head, self._context, self._read = text, self._read, len(self.ids)
            self._context_text = self.decode(self.ids[self._context:self._read])
        hits = [(i, s) for s in self.stops if (i := text.find(s, searched)) >= 0]
        if hits:
            index, self.stop_reason = min(hits)
            self.text = text[: index + len(self.stop_reason)] if self.include_stop else text[:index]
            return True
        self.text = text
        return False


def stream_piece(text: str, sent: int, holdback: int, final: bool) -> tuple[str, int]:
    """The next piece of `text` a stream may send after `sent` characters, and the new count: all of it when
    final, else without a trailing partial UTF-8 character or the last `holdback` characters."""
    end = len(text)
    if not final:
        end = max(sent, len(text.rstrip("\ufffd")) - holdback)
    return text[sent:end], end


def finish_reason(engine_reason: str | None, stop_reason: str | None) -> str:
    """OpenAI's finish_reason from the engine's (Request.finish_reason) and the stop string that ended the text."""
    return "length" if engine_reason == "length" and stop_reason is None else "stop"


def stop_reason(text_stop: str | None, engine_reason: str | None, ids: list[int]) -> str | int | None:
    """vLLM's stop_reason: the stop string, or the stop token id, that ended the output (None: EOS or length)."""
    return ids[-1] if text_stop is None and engine_reason == "stop_words" and ids else text_stop


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """vLLM's count: every generated token, the end token included (vLLM's output token_ids keep it), per choice."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """Responses and stream chunks of one request: `text_completion` or `chat.completion`, one choice per prompt
    and sample (choice index = prompt index * n + sample index, as vLLM numbers them)."""

    def __init__(self, chat: bool, model: str, return_token_ids: bool):
        self.chat, self.model, self.token_ids = chat, model, return_token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def choice(self, index: int, text: str, *, finish: str | None = None, stop_reason: str | int | None = None,
               ids: list[int] | None = None, prompt_ids: list[int] | None = None, logprobs: dict | None = None,
               prompt_logprobs: list | None = None, chunk: bool = False, first: bool = False) -> dict:
        """One choice (`first`: a stream's first chunk of it, which carries the chat role and the prompt's ids)."""
        choice: dict = {"index": index}
        if not self.chat:
            choice["text"] = text
        elif not chunk:
            choice["message"] = {"role": "assistant", "content": text}
        elif first:
            choice["delta"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {"content": text} if text else {}
        choice.update(logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)
        if prompt_logprobs is not None and (first or not chunk):
            choice["prompt_logprobs"] = prompt_logprobs
        if self.token_ids and ids is not None:
            choice["token_ids"] = ids
            if not self.chat and (first or not chunk):
                choice["prompt_token_ids"] = prompt_ids
        return choice

    def response(self, choices: list[dict], prompt_tokens: int, completion_tokens: int,
                 prompt_ids: list[int] | None = None, prompt_logprobs: list | None = None) -> dict:
        extra: dict = {"prompt_token_ids": prompt_ids} if self.chat and self.token_ids else {}
        if prompt_logprobs is not None:
            extra["prompt_logprobs"] = prompt_logprobs
        return self._envelope(self.object, choices, usage=usage(prompt_tokens, completion_tokens), **extra)

    def chunk(self, choice: dict, prompt_ids: list[int] | None = None) -> dict:
        extra = {"prompt_token_ids": prompt_ids} if self.chat and self.token_ids and prompt_ids is not None else {}
        return self._envelope(f"{self.object}.chunk" if self.chat else self.object, [choice], **extra)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage(prompt_tokens, completion_tokens))

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

from pydantic import BaseModel, ConfigDict

from trtllm_bdlora.engine.request import (
    SamplingParams,
    chat_prompt_ids,
    check_number,
    check_token_ids,
    text_prompt_ids,
)
from trtllm_bdlora.errors import BdLoraError, RequestError, public_text

# Fields this server cannot honour, with the values that mean "off": anything else is a 400 naming the field.
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "min_p": (None, 0),
    "use_beam_search": (None, False),
    "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
    "prompt_logprobs": (None,),
}
MAX_STOPS = 4


def error_body(err: BdLoraError) -> dict:
    """An error as OpenAI answers it: `{"error": {"message", "type", "param", "code"}}`, status and type from the one
    table of errors.py."""
    status = err.status
    return {"error": {"message": public_text(str(err)), "type": status.openai_type, "param": err.param,
                      "code": status.http}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False


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

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise RequestError(f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
        return stops

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise RequestError(f"n must be 1 (one choice per request), got {self.n}", param="n")
        for key, value in (self.model_extra or {}).items():
            if key in UNSUPPORTED and value not in UNSUPPORTED[key]:
                raise RequestError(f"{key}={value!r} is not supported by this server", param=key)

    def sampling_params(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        """These fields on the one request model (engine/request.py), with OpenAI's defaults and vLLM's extensions:
        -1 and 0 turn top_k off; temperature 0 stays greedy whatever top_k says; penalties in OpenAI's range
        [-2, 2]; an unset seed is drawn at random."""
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
            seed=random.getrandbits(63) if self.seed is None else self.seed,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            min_tokens=self.min_tokens or 0, end_ids=frozenset() if self.ignore_eos else None, stop_words=stop_words)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]

    def prompt_ids(self, tokenizer, max_seq_len: int) -> list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return text_prompt_ids(tokenizer, prompt, max_seq_len)
        if all(isinstance(t, int) for t in prompt):
            return prompt
        raise RequestError("send one prompt per request (a string or a list of token ids)", param="prompt")


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict]
    max_completion_tokens: int | None = None

    def prompt_ids(self, tokenizer, max_seq_len: int) -> list[int]:
        return chat_prompt_ids(tokenizer, self.chat_messages(), max_seq_len=max_seq_len)

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
    """The text of a growing token list (decoded whole each time), cut before the first stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None

    @property
    def holdback(self) -> int:
        """Characters a stream must hold back: they may begin a stop string."""
        return max((len(s) for s in self.stops), default=1) - 1

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string completed (the text then ends before it)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            index, self.stop_reason = min(hits)
            self.text = text[:index]
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
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """Responses and stream chunks of one request: `text_completion` or `chat.completion`."""

    def __init__(self, chat: bool, model: str, return_token_ids: bool, prompt_ids: list[int]):
        self.chat, self.model, self.token_ids = chat, model, return_token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_ids = prompt_ids

    def _envelope(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _choice(self, text: str, finish: str | None, stop_reason: str | int | None, ids: list[int] | None,
                chunk: bool, first: bool = False) -> dict:
        choice: dict = {"index": 0}
        if not self.chat:
            choice["text"] = text
        elif not chunk:
            choice["message"] = {"role": "assistant", "content": text}
        elif first:
            choice["delta"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {"content": text} if text else {}
        choice.update(logprobs=None, finish_reason=finish, stop_reason=stop_reason)
        if self.token_ids and ids is not None:
            choice["token_ids"] = ids
            if not self.chat and (first or not chunk):
                choice["prompt_token_ids"] = self.prompt_ids
        return choice

    def _prompt_ids(self, first: bool) -> dict:
        return {"prompt_token_ids": self.prompt_ids} if self.chat and self.token_ids and first else {}

    def response(self, text: str, ids: list[int], finish: str, stop_reason: str | int | None) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return self._envelope(obj, [self._choice(text, finish, stop_reason, ids, chunk=False)],
                              usage=usage(len(self.prompt_ids), len(ids)), **self._prompt_ids(True))

    def chunk(self, text: str, ids: list[int], finish: str | None = None, stop_reason: str | int | None = None,
              first: bool = False) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [self._choice(text, finish, stop_reason, ids, chunk=True, first=first)],
                              **self._prompt_ids(first))

    def usage_chunk(self, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage(len(self.prompt_ids), completion_tokens))

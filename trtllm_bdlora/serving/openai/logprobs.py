"""Log-probs in the shapes vLLM's OpenAI server gives them (vllm/entrypoints/openai/completion/serving.py
`_create_completion_logprobs`, chat_completion/serving.py `_create_chat_logprobs`, read 2026-11): completions'
`{text_offset, token_logprobs, tokens, top_logprobs}`, chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`,
and vLLM's `prompt_logprobs` (per prompt position None or `{token id: {logprob, rank, decoded_token}}`). The values are
the model's raw log-probs (engine/logprobs.py); -inf is written as -9999.0, as vLLM and OpenAI write it.
"""

from __future__ import annotations

from collections.abc import Callable

from trtllm_bdlora.engine.logprobs import TokenLogprobs

FLOOR = -9999.0


def _clamp(value: float) -> float:
    return max(value, FLOOR)


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobs | None], k: int, decode: Callable[[int], str],
                        text_offset: int = 0) -> dict:
    """Completions' logprobs for `token_ids` (entries[i] None: no log-prob, the first prompt token). Each position's
    `top_logprobs` holds the token that is there, then the `k` most likely (at most k + 1 entries, keyed by text)."""
    offsets, logprobs, tokens, tops = [], [], [], []
    for token, entry in zip(token_ids, entries):
        text = decode(token)
        offsets.append(text_offset)
        text_offset += len(text)
        tokens.append(text)
        if entry is None:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(_clamp(entry.logprob))
        top = {text: _clamp(entry.logprob)}
        for other, value in entry.top[:k]:
            top.setdefault(decode(other), _clamp(value))
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": logprobs, "tokens": tokens, "top_logprobs": tops}


def _chat_token(token: int, logprob: float, decode: Callable[[int], str]) -> dict:
    text = decode(token)
    return {"token": text, "logprob": _clamp(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_logprobs(entries: list[TokenLogprobs], k: int, decode: Callable[[int], str]) -> dict:
    """Chat's logprobs: per generated token its own, and the `k` most likely (OpenAI's `top_logprobs`)."""
    return {"content": [dict(_chat_token(e.token, e.logprob, decode),
                             top_logprobs=[_chat_token(t, v, decode) for t, v in e.top[:k]]) for e in entries]}


def prompt_logprobs(entries: list[TokenLogprobs], decode: Callable[[int], str]) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then the prompt token and the top-k of each
    position, keyed by token id."""
    def one(token: int, logprob: float, rank: int) -> dict:
        return {"logprob": _clamp(logprob), "rank": rank, "decoded_token": decode(token)}

    out: list[dict | None] = [None]
    for e in entries:
        position = {str(e.token): one(e.token, e.logprob, e.rank)}
        for rank, (token, value) in enumerate(e.top, start=1):
            position.setdefault(str(token), one(token, value, rank))
        out.append(position)
    return out

"""Text <-> token tensors as TensorRT-LLM's `preprocessing` / `postprocessing` Python models define them.
Pure functions of a Hugging Face tokenizer and numpy arrays, used by `serve` and by `model_repo/`'s models.

Upstream rules (triton_backend/all_models/inflight_batcher_llm/preprocessing/1/model.py):
- end / pad ids: the first id of the tokenizer's eos / pad token (pad falls back to eos);
- queries are encoded with `add_special_tokens` (default true) and right-padded with the pad id;
- a word list is `[batch, 2, n]`: the words' ids back to back, then their cumulative end offsets padded
  with -1 (ids padded with 0); every string element is one word, encoded without special tokens;
- the embedding bias is `[batch, len(vocab)]`, each word's weight added at each of its ids;
- output ids are decoded per beam up to their sequence length (`skip_special_tokens`, default true).
"""

from __future__ import annotations

import numpy as np

from trtllm_bdlora.errors import InputError, RequestError
from trtllm_bdlora.serving.edge.payload import check_text


def _text(value, name: str = "text") -> str:
    """A string element as text; bytes that are not UTF-8 are refused (as upstream's `bytes.decode()`), never
    silently replaced, and so is text holding NUL or a lone surrogate (payload.text_problem)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(name, f"is not valid UTF-8 (byte 0x{value[err.start]:02x} at offset {err.start})") from None
    return check_text(name, str(value))


def special_ids(tokenizer) -> tuple[int, int]:
    """(end id, pad id) as upstream's preprocessing derives them."""
    eos = tokenizer.eos_token
    if eos is None:
        raise RequestError("the tokenizer has no eos token: send END_ID and PAD_ID")
    pad = tokenizer.pad_token or eos
    return tokenizer.encode(eos, add_special_tokens=False)[0], tokenizer.encode(pad, add_special_tokens=False)[0]


def encode_queries(tokenizer, queries: np.ndarray, add_special_tokens: bool, pad_id: int, name: str = "QUERY"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(ids [batch, longest] int32 right-padded, lengths [batch, 1] int32) of a [batch, 1] string tensor."""
    ids = [tokenizer.encode(_text(q[0], name), add_special_tokens=add_special_tokens) for q in queries]
    width = max(1, max(len(i) for i in ids))
    padded = np.array([i + [pad_id] * (width - len(i)) for i in ids], dtype=np.int32)
    return padded, np.array([[len(i)] for i in ids], dtype=np.int32)


def word_list(tokenizer, words: np.ndarray | None, batch_size: int, name: str = "words") -> np.ndarray:
    if words is None:
        return np.zeros((batch_size, 2, 0), dtype=np.int32)
    flat, offsets = [], []
    for row in words:
        ids, ends = [], []
        for word in row:
            encoded = tokenizer.encode(_text(word, name), add_special_tokens=False)
            if encoded:
                ids += encoded
                ends.append(len(ids))
        flat.append(ids)
        offsets.append(ends)
    width = max(1, max(len(i) for i in flat))
    out = np.zeros((len(flat), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for b, (ids, ends) in enumerate(zip(flat, offsets)):
        out[b, 0, : len(ids)] = ids
        out[b, 1, : len(ends)] = ends
    return out


def parse_word_list(array: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """One request's `[2, n]` (or `[1, 2, n]`) word list as token sequences (TensorRT-LLM convertWordList)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.size == 0:
        return ()
    if a.ndim != 2 or a.shape[0] != 2:
        raise RequestError(f"a word list must have shape [2, n], got {list(a.shape)}")
    ids, ends = a[0].tolist(), a[1].tolist()
    words, start = [], 0
    for end in ends:
        if end < 0:
            break
        if end <= start or end > len(ids):
            raise RequestError(f"word list offsets must increase within [1, {len(ids)}], got {ends}")
        words.append(tuple(ids[start:end]))
        start = end
    return tuple(words)


def embedding_bias(tokenizer, words: np.ndarray | None, weights: np.ndarray | None, batch_size: int) -> np.ndarray:
    if words is None or weights is None:
        return np.zeros((batch_size, 0), dtype=np.float32)
    vocab = len(tokenizer.vocab)
    out = np.zeros((len(words), vocab), dtype=np.float32)
    for b, (row_words, row_weights) in enumerate(zip(words, weights)):
        if len(row_words) != len(row_weights):
            raise RequestError("embedding bias words and weights must have the same length")
        for word, weight in zip(row_words, row_weights):
            for i in tokenizer.encode(_text(word, "EMBEDDING_BIAS_WORDS")):
                out[b, i] += weight
    return out


def decode(tokenizer, tokens: np.ndarray, lengths: np.ndarray | None, skip_special_tokens: bool) -> np.ndarray:
    """UTF-8 texts of [batch, beams, n] ids, each cut at its length, flat ([batch * beams]) as upstream sends them."""
    texts = []
    for b, beams in enumerate(tokens):
        for k, ids in enumerate(beams):
            n = int(lengths[b][k]) if lengths is not None else len(ids)
            texts.append(tokenizer.decode([int(t) for t in ids[:n]], skip_special_tokens=skip_special_tokens).encode())
    return np.array(texts, dtype=object)


def flag(value: str | None, default: bool) -> bool:
    """A model-config boolean parameter as upstream reads it (unset or unfilled: the default)."""
    if value is None or value.startswith("${") or value.lower() not in ("true", "false", "1", "0", "t", "f", "y", "n",
                                                                          "yes", "no"):
        return default
    return value.lower() in ("true", "1", "t", "y", "yes")

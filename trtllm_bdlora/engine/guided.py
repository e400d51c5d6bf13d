"""Guided decoding (structured output) with xgrammar, pinned in pyproject.toml: the grammar library TensorRT-LLM's
guided decoder uses, so its guide types mean what they mean there (`json`: any JSON; `json_schema`; `regex`;
`ebnf_grammar`: GBNF, as xgrammar reads it), plus OpenAI's `json_object` (any JSON object).

A guide is compiled once per distinct guide text (xgrammar's compiler caches it), on the front end's thread, so a bad
schema is a 400 before the request is queued and compiling never stalls the engine thread. Each request then owns one
matcher; on rank 0, before sampling, its mask sets the logits of the tokens the grammar forbids to the floor (per
sequence, so a batch mixes guided and free requests and any adapters), and the sampled token advances it. Why
xgrammar and not llguidance or outlines-core: its mask costs ~15 us per token on this machine's CPU against
~300-600 us for llguidance (measured with smollm2's 49152-token vocabulary), and TensorRT-LLM's semantics come free.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from trtllm_bdlora.errors import InputError, RequestError

GUIDE_KINDS = ("json", "json_object", "json_schema", "regex", "ebnf_grammar")
CACHE_LIMIT_BYTES = 256 << 20  # compiled grammars kept for reuse
MAX_WHITESPACE = 8  # a run of JSON whitespace longer than this is forbidden: small models otherwise loop on newlines
# xgrammar 0.2.8 writes the characters of a string with minLength / maxLength as [^"\\\r\n], which lets raw control
# characters (invalid JSON) through; its plain strings exclude \0-\x1f as JSON requires
LENGTH_BOUNDED_CHAR = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]')


@functools.lru_cache(maxsize=256)
def json_schema_grammar(schema: str, strict: bool = True) -> str:
    """The EBNF grammar xgrammar writes for a JSON schema, with its length-bounded string characters limited to
    what JSON allows unescaped."""
    import xgrammar

    text = str(xgrammar.Grammar.from_json_schema(schema, strict_mode=strict, max_whitespace_cnt=MAX_WHITESPACE))
    return text.replace(*LENGTH_BOUNDED_CHAR)


@dataclass(frozen=True)
class Guide:
    """What the output must match: `kind` one of GUIDE_KINDS, `text` the schema, regex or grammar (empty for json
    and json_object)."""

    kind: str
    text: str = ""


class GuideMatcher:
    """One request's grammar state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher, vocab_size: int):
        import xgrammar

        self._matcher, self.vocab_size = matcher, vocab_size
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._bits = torch.arange(32, dtype=torch.int32)

    @property
    def done(self) -> bool:
        """The grammar is complete and its stop token (if any) was accepted: nothing more may follow."""
        return self._matcher.is_terminated()

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        words = self._bitmask[0].to(torch.int32)
        return ((words.unsqueeze(1) >> self._bits) & 1).bool().flatten()[: self.vocab_size]

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RequestError(f"guided decoding: token {token} was sampled but the grammar does not allow it")


class Guides:
    """Rank 0: compiles guides against one tokenizer (thread safe; built on first use, which takes a second or two)."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar

        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_limit_bytes=CACHE_LIMIT_BYTES)

    def compile(self, guide: Guide, name: str):
        """The compiled grammar of `guide`; an InputError naming the field `name` when it is not valid."""
        compiler = self._compiler
        try:
            if guide.kind == "json":
                return compiler.compile_builtin_json_grammar()
            if guide.kind == "json_object":
                return compiler.compile_grammar(json_schema_grammar('{"type": "object"}', strict=False))
            if guide.kind == "json_schema":
                return compiler.compile_grammar(json_schema_grammar(guide.text))
            if guide.kind == "regex":
                return compiler.compile_regex(guide.text)
            if guide.kind == "ebnf_grammar":
                return compiler.compile_grammar(guide.text)
        except Exception as err:  # xgrammar's own complaint (RuntimeError, InvalidJSONError, ...), one line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(name, f"is not a valid {guide.kind.replace('_', ' ')}: {reason}") from None
        raise InputError(name, f"unknown guide type {guide.kind!r}: one of {', '.join(GUIDE_KINDS)}")

    def matcher(self, guide: Guide, stop_ids: frozenset[int] | set[int], name: str = "guide") -> GuideMatcher:
        """A fresh matcher for one request; the grammar ends on one of `stop_ids` (none: it ends by itself)."""
        import xgrammar

        compiled = self.compile(guide, name)
        stops = sorted(t for t in stop_ids if 0 <= t < self.vocab_size)
        state = xgrammar.GrammarMatcher(compiled, override_stop_tokens=stops or None, terminate_without_stop_token=not stops)
        return GuideMatcher(state, self.vocab_size)


_guides: dict[int, tuple[Any, Guides]] = {}
_lock = threading.Lock()


def guides_for(tokenizer, vocab_size: int) -> Guides:
    """The one Guides of this tokenizer in this process."""
    if tokenizer is None:
        raise RequestError("guided decoding needs the model's tokenizer")
    with _lock:
        entry = _guides.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = _guides[id(tokenizer)] = (tokenizer, Guides(tokenizer, vocab_size))
        return entry[1]


def json_schema_text(schema: Any, name: str) -> str:
    """A JSON schema sent as an object (OpenAI) or as text (Triton) -> its text; an InputError when it is neither."""
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, str):
        try:
            if isinstance(json.loads(schema), dict):
                return schema
        except json.JSONDecodeError as err:
            raise InputError(name, f"is not valid JSON: {err}") from None
    raise InputError(name, "must be a JSON schema object")


def attach_guide(req, tokenizer, vocab_size: int, eos_ids, name: str = "guide") -> None:
    """Give a built Request with `params.guide` its matcher (compiling the guide now: errors before it is queued)."""
    guide = req.params.guide
    if guide is None:
        return
    stops = eos_ids if req.params.end_ids is None else req.params.end_ids
    req.guide_matcher = guides_for(tokenizer, vocab_size).matcher(guide, frozenset(stops), name)

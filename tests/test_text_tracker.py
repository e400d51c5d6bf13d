"""The OpenAI layer's incremental detokeniser (`TextTracker`) against the plain definition: the whole token list
decoded at every token, and the first stop string found in that text. Random tokens of the embedded model's
byte-level tokenizer (pieces of UTF-8 characters, special tokens skipped) and of a SentencePiece-style one (whose
decoder drops the first token's leading space), random stop strings taken from the text itself."""

import importlib.util
import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.helpers import REPO
from trtllm_bdlora.llama.loader import embedded_model_dir
from trtllm_bdlora.serving.openai.protocol import TextTracker, stream_piece


def whole_decode_reference(decode, stops: list[str], include_stop: bool, ids: list[int]):
    """Per token: (stopped, text, stop string), decoding the whole list each time."""
    out = []
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        hits = [(i, s) for s in stops if (i := text.find(s)) >= 0]
        if hits:
            index, stop = min(hits)
            out.append((True, text[: index + len(stop)] if include_stop else text[:index], stop))
            return out
        out.append((False, text, None))
    return out


def streamed(decode, stops: list[str], include_stop: bool, ids: list[int]) -> tuple[str, str]:
    """What a stream sends (the pieces joined, as api.py sends them) and the finished text a response reports."""
    tracker = TextTracker(decode, stops, include_stop)
    pieces, sent = [], 0
    for token in ids:
        stopped = tracker.add(token)
        piece, sent = stream_piece(tracker.text, sent, tracker.holdback, final=False)
        pieces.append(piece)
        if stopped:
            break
    piece, sent = stream_piece(tracker.final_text, sent, tracker.holdback, final=True)
    return "".join(pieces + [piece]), tracker.final_text


def tracked(decode, stops: list[str], include_stop: bool, ids: list[int]):
    tracker = TextTracker(decode, stops, include_stop)
    out = []
    for token in ids:
        stopped = tracker.add(token)
        out.append((stopped, tracker.text, tracker.stop_reason))
        if stopped:
            break
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def byte_level(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True), len(tokenizer), tokenizer.all_special_ids


def sentencepiece_style():
    vocab = {"<unk>": 0, "<s>": 1, "▁": 2, "▁the": 3, "▁cat": 4, "s": 5, "at": 6, "▁ä": 7, "é": 8, "<0xE2>": 9,
             "<0x82>": 10, "<0xAC>": 11, "▁sat": 12, ".": 13, "\n": 14}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", unk_token="<unk>")
    return lambda ids: fast.decode(ids, skip_special_tokens=True), len(vocab), [1]


def random_ids(rng: random.Random, vocab: int, special: list[int], n: int) -> list[int]:
    # mostly ordinary tokens, some special ones, and runs of the byte tokens that make up multi-byte characters
    return [rng.choice(special) if rng.random() < 0.03 else rng.randrange(vocab) for _ in range(n)]


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_incremental_text_equals_whole_decode_at_every_token(kind, byte_level, tokenizer):
    decode, vocab, special = byte_level if kind == "byte_level" else sentencepiece_style()
    rng = random.Random(7)
    checked_fffd = 0
    for trial in range(60):
        ids = random_ids(rng, vocab, special, rng.randrange(1, 120))
        if kind == "byte_level" and trial % 3 == 0:  # whole characters split over byte tokens: é, €, 🙂
            ids = [t for ch in "é€🙂 ok" for t in tokenizer.encode(ch)] + ids
        full = decode(ids)
        stops = [] if trial % 4 == 0 else [full[i:i + rng.randrange(1, 6)] for i in
                                           (rng.randrange(max(1, len(full))) for _ in range(rng.randrange(1, 3)))]
        stops = [s for s in stops if s]
        for include in (False, True):
            reference = whole_decode_reference(decode, stops, include, ids)
            assert tracked(decode, stops, include, ids) == reference
            stream, final = streamed(decode, stops, include, ids)
            assert stream == final  # a stream sends exactly the finished text
            stopped, text, _ = reference[-1]
            assert final == text if stopped else final in (text, text.rstrip("\ufffd"))
        checked_fffd += any(decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids) + 1))
    assert checked_fffd > 0  # some prefix did end inside a character


def test_stop_string_split_across_many_tokens(byte_level, tokenizer):
    decode, _, _ = byte_level
    ids = tokenizer.encode("The answer is 42. ### END of the answer ### more text")
    for stops in (["### END"], ["END of"], ["answer ###", "is 4"], ["not there"]):
        for include in (False, True):
            assert tracked(decode, stops, include, ids) == whole_decode_reference(decode, stops, include, ids)


def test_a_token_decodes_a_short_window_whatever_the_length(byte_level, tokenizer):
    decode, _, _ = byte_level
    ids = tokenizer.encode("word é€🙂 " * 1000)  # the three characters take 2, 3 and 4 byte tokens
    lengths: list[int] = []
    tracker = TextTracker(lambda window: lengths.append(len(window)) or decode(window), ["never"])
    for token in ids:
        tracker.add(token)
    assert tracker.text == decode(ids)
    assert max(lengths) <= 6, max(lengths)


def test_an_output_ending_inside_a_character_reports_the_complete_ones(byte_level, tokenizer):
    """max_tokens reached inside a character: while running, `text` is the whole decode (a stream holds back its
    U+FFFD); the finished text, as vLLM's, drops the incomplete character and keeps everything before it."""
    decode, _, _ = byte_level
    for text in ("ok 🙂", "naïve 🚀", "日本語", "ŋ"):
        last = tokenizer.encode(text[-1])
        assert len(last) > 1  # the last character takes several byte tokens
        ids = tokenizer.encode(text[:-1]) + last
        tracker = TextTracker(decode, [])
        for token in ids[:-1]:
            tracker.add(token)
        assert tracker.text == decode(ids[:-1]) and tracker.text.endswith("\ufffd")
        assert tracker.final_text == text[:-1]
        tracker.add(ids[-1])
        assert tracker.text == tracker.final_text == text


def test_a_character_that_never_completes_is_kept_where_the_output_goes_on(byte_level, tokenizer):
    """A lead byte followed by other text is a finished (invalid) character: its U+FFFD stays in the text, before
    more text and before a stop string, streamed or not; only at the very end of an output is it left out."""
    decode, _, _ = byte_level
    lead = tokenizer.encode("🙂")[0]
    assert decode([lead]) == "\ufffd"
    ids = tokenizer.encode("ab") + [lead] + tokenizer.encode("XY cd")
    assert streamed(decode, ["XY"], False, ids) == ("ab\ufffd", "ab\ufffd")
    assert streamed(decode, ["XY"], True, ids) == ("ab\ufffdXY", "ab\ufffdXY")
    assert streamed(decode, [], False, ids) == ("ab\ufffdXY cd", "ab\ufffdXY cd")
    assert streamed(decode, [], False, ids[: len(tokenizer.encode("ab")) + 1]) == ("ab", "ab")


def test_detokenize_benchmark_runs(capsys):
    spec = importlib.util.spec_from_file_location("detokenize", REPO / "benchmarks" / "detokenize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--lengths", "64", "--last", "8"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| 64 | ") and row.endswith("x |"), row

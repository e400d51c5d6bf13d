"""Unit checks of the log-prob and guided-decoding pieces against float64 torch and JSON's own rules: per-position
log-probs, ranks and top-k; prompt log-probs the same whatever the prefill chunking; vLLM's response shapes; the
OpenAI fields that map onto them; xgrammar's length-bounded strings kept to valid JSON."""

import json

import pytest
import torch

from trtllm_bdlora.engine.logprobs import position_logprobs, prompt_chunk_logprobs
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.serving.openai.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from trtllm_bdlora.serving.openai.protocol import ChatCompletionRequest, CompletionRequest, TextTracker


def test_position_logprobs_rank_and_top_k_equal_float64_log_softmax():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 300, generator=gen) * 3
    tokens = torch.randint(0, 300, (5,), generator=gen).tolist()
    reference = torch.log_softmax(logits.double(), -1)
    for row, token, entry in zip(reference, tokens, position_logprobs(logits, tokens, 4)):
        assert entry.token == token and abs(entry.logprob - float(row[token])) < 1e-12
        assert entry.rank == 1 + int((row > row[token]).sum())
        values, ids = torch.topk(row, 4)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert all(abs(v - w) < 1e-12 for (_, v), w in zip(entry.top, values.tolist()))


def test_prompt_logprobs_do_not_depend_on_the_chunking():
    gen = torch.Generator().manual_seed(12)
    prompt = torch.randint(0, 50, (9,), generator=gen).tolist()
    logits = torch.randn(9, 50, generator=gen)  # row i predicts prompt[i + 1]; the last row, the first output
    whole = prompt_chunk_logprobs(logits, prompt, 0, 2)
    assert [e.token for e in whole] == prompt[1:]
    for cut in ([0, 4, 9], [0, 1, 2, 8, 9], [0, 3, 6, 9]):
        parts = [e for a, b in zip(cut, cut[1:]) for e in prompt_chunk_logprobs(logits[a:b], prompt, a, 2)]
        assert parts == whole


def test_completion_and_chat_shapes_as_vllm_writes_them():
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(3, 40, generator=gen)
    logits[1, 7] = -float("inf")
    tokens = [int(logits[0].argmin()), 7, int(logits[2].argmax())]
    entries = position_logprobs(logits, tokens, 2)
    decode = lambda t: f"<{t}>"  # noqa: E731
    out = completion_logprobs(tokens, [None, *entries[1:]], 2, decode, text_offset=5)
    assert out["tokens"] == [decode(t) for t in tokens] and out["text_offset"] == [5, 5 + len(decode(tokens[0])),
                                                                                    5 + len(decode(tokens[0])) + 3]
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    assert out["token_logprobs"][1] == -9999.0  # -inf, as OpenAI and vLLM write it
    assert len(out["top_logprobs"][1]) == 3 and list(out["top_logprobs"][1])[0] == "<7>"  # the token, then the top 2
    assert len(out["top_logprobs"][2]) == 2  # the token is the most likely one
    chat = chat_logprobs(entries, 1, decode)["content"]
    assert [c["token"] for c in chat] == [decode(t) for t in tokens]
    assert all(len(c["top_logprobs"]) == 1 and c["bytes"] == list(c["token"].encode()) for c in chat)
    prompt = prompt_logprobs(entries[1:], decode)
    assert prompt[0] is None and prompt[1][str(tokens[1])] == {"logprob": -9999.0, "rank": entries[1].rank,
                                                              "decoded_token": "<7>"}


def test_openai_fields_map_onto_the_request_model():
    body = CompletionRequest(prompt="x", echo=True, logprobs=1)
    assert body.logprob_count() == 1 and body.prompt_top_logprobs() == 1  # vLLM: echo gives the prompt's too
    assert CompletionRequest(prompt="x", logprobs=2, prompt_logprobs=0).prompt_top_logprobs() == 0
    assert ChatCompletionRequest(messages=[], logprobs=True).logprob_count() == 0
    with pytest.raises(BdLoraError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest(messages=[], top_logprobs=3).logprob_count()
    schema = {"type": "object"}
    guide = CompletionRequest(prompt="x", response_format={"type": "json_schema", "json_schema": {"name": "a",
                                                                                                   "schema": schema}}).guide()
    assert guide.kind == "json_schema" and json.loads(guide.text) == schema
    for fmt in ({"type": "json_schema"}, {"type": "yaml"}):
        with pytest.raises(BdLoraError, match="response_format"):
            CompletionRequest(prompt="x", response_format=fmt).guide()
    with pytest.raises(BdLoraError, match="tools"):
        CompletionRequest(prompt="x", tool_choice="required").check_supported()
    with pytest.raises(BdLoraError, match="echo"):
        ChatCompletionRequest(messages=[], echo=True).check_supported()


def test_include_stop_str_in_output_keeps_the_stop_string():
    pieces = {0: "Hel", 1: "lo w", 2: "orld"}
    for include, text in ((False, "Hel"), (True, "Hello")):
        tracker = TextTracker(lambda ids: "".join(pieces[i] for i in ids), ["lo"], include_stop=include)
        assert not tracker.add(0) and tracker.add(1) and tracker.text == text and tracker.stop_reason == "lo"
        assert tracker.holdback == (0 if include else 1)


def test_length_bounded_json_strings_refuse_raw_control_characters():
    from transformers import AutoTokenizer

    from trtllm_bdlora.engine.guided import Guide, guides_for
    from trtllm_bdlora.llama.loader import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    guides = guides_for(tokenizer, len(tokenizer))
    schema = json.dumps({"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"]})
    matcher = guides.matcher(Guide("json_schema", schema), {tokenizer.eos_token_id})
    control_tokens = [t for t in range(len(tokenizer)) if tokenizer.decode([t]) == "\x10"]
    assert control_tokens
    for token in tokenizer.encode('{"s": "ab', add_special_tokens=False):
        assert matcher.allowed()[token]
        matcher.accept(token)
    assert not matcher.allowed()[control_tokens[0]]  # JSON forbids raw control characters in strings
    with pytest.raises(BdLoraError, match="response_format is not a valid json schema"):
        guides.matcher(Guide("json_schema", '{"type": "object", "properties": 3}'), set(), "response_format")

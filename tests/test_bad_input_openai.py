"""Every bad OpenAI request in one table, against the session's OpenAI server (tests/conftest.py `openai_served`):
each is a 400 OpenAI error (`BadRequestError`) whose one-line message names the problem, nothing is registered by
it, and the server answers the next request."""

import openai
import pytest

from tests.serving_helpers import post_json

DEEP = b"[" * 100_000 + b"]" * 100_000  # nesting no JSON parser should recurse into
HI = {"model": "1", "prompt": "Hi"}

BAD_REQUESTS = {  # case: (path, body: a dict sent as JSON or the raw bytes, words the message must hold)
    "not JSON": ("/v1/completions", b'{"model": "1", "prompt": ', "not valid JSON"),
    "not an object": ("/v1/completions", b"[1, 2]", "invalid request body"),
    "missing prompt": ("/v1/completions", {"model": "1", "max_tokens": 2}, "prompt"),
    "wrong type": ("/v1/completions", {**HI, "max_tokens": "many"}, "max_tokens"),
    "n too large": ("/v1/completions", {**HI, "n": 65}, "n must be <= 64"),
    "unsupported field": ("/v1/completions", {**HI, "logit_bias": {"5": 1.0}}, "logit_bias"),
    "too many logprobs": ("/v1/completions", {**HI, "logprobs": 21}, "logprobs must be <= 20"),
    "tool_choice without tools": ("/v1/completions", {**HI, "tool_choice": "auto"}, "tools"),
    "bad temperature": ("/v1/completions", {**HI, "temperature": -1}, "temperature"),
    "over the context": ("/v1/completions", {**HI, "max_tokens": 10**6}, "exceeds the context"),
    "too many stops": ("/v1/completions", {**HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "NaN temperature": ("/v1/completions", b'{"model": "1", "prompt": "Hi", "temperature": NaN}',
                        "temperature must be finite"),
    "infinite top_p": ("/v1/completions", b'{"model": "1", "prompt": "Hi", "top_p": Infinity}', "top_p must be finite"),
    "overflowing temperature": ("/v1/completions", b'{"model": "1", "prompt": "Hi", "temperature": 1e999}',
                                "temperature must be finite"),
    "top_p zero": ("/v1/completions", {**HI, "top_p": 0}, "top_p must be > 0"),
    "negative seed": ("/v1/completions", {**HI, "seed": -5}, "seed must be >= 0"),
    "stop token outside the vocabulary": ("/v1/completions", {**HI, "stop_token_ids": [10**9]}, "stop_token_ids"),
    "prompt lone surrogate": ("/v1/completions", b'{"model": "1", "prompt": "\\ud800"}', "prompt"),
    "model lone surrogate": ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', "model"),
    "message lone surrogate": ("/v1/chat/completions",
                               b'{"model": "1", "messages": [{"role": "user", "content": "x\\udfff"}]}',
                               "messages[0].content"),
    "completions nested": ("/v1/completions", DEEP, "nested"),
    "chat nested": ("/v1/chat/completions", DEEP, "nested"),
    "lora_name lone surrogate": ("/v1/load_lora_adapter", b'{"lora_name": "\\ud800", "lora_path": "a1"}', "lora_name"),
    "lora_name control character": ("/v1/load_lora_adapter", {"lora_name": "a\nb", "lora_path": "a1"}, "lora_name"),
    "lora_path NUL": ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a\u0000"}, "lora_path"),
}


@pytest.fixture(scope="module")
def client(openai_served):
    return openai.OpenAI(base_url=openai_served[0].openai_url, api_key="unused", max_retries=0)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_a_400_naming_the_problem_and_server_keeps_serving(openai_served, client, case):
    path, body, words = BAD_REQUESTS[case]
    status, payload = post_json(openai_served[0], path, body)
    assert status == 400, payload
    error = payload["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400, error
    assert words in error["message"] and "\n" not in error["message"], error["message"]
    assert client.completions.create(model="1", prompt="Hello", max_tokens=2, temperature=0).choices[0].text
    listed = {m.id for m in client.models.list().data}
    assert not listed & {"x", "a\nb", "\ud800"}, listed


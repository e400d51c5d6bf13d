"""The official `openai` client against `serve --tp 2` under the user's `mpirun -n 2` (the other serving tests use
serve's own launcher): completions and chat completions, streamed and not, equal in tokens to `generate`;
/v1/models; OpenAI-shaped errors; run-time adapter loading confined to --adapter-root; adapters registered through
gRPC usable through OpenAI and the other way round."""

import json
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import tritonclient.grpc as grpcclient

from tests.helpers import run_cli
from tests.serving_helpers import infer as stream_infer
from tests.serving_helpers import post_json, warm_openai_client
from trtllm_bdlora.cli.client import converted_adapter, infer

MAX_TOKENS = 10
# (name, OpenAI model, generate adapter, kind, prompt or user message, extra sampling settings)
CASES = [
    ("completion adapter 1", "1", 1, "completion", "Hello there", {}),
    ("completion named adapter", "alpha", 2, "completion", "The capital of France is", {}),
    ("completion base model", None, None, "completion", "Once upon a time", {}),
    ("chat adapter 1", "1", 1, "chat", "List three colors", {}),
    ("chat named adapter", "alpha", 2, "chat", "What is two plus two?", {}),
    ("chat base model", None, None, "chat", "Say hello", {}),
    ("sampled with seed", "alpha", 2, "completion", "Write a poem", {"temperature": 0.9, "top_p": 0.9, "seed": 11}),
    ("loaded at run time", "gamma", 3, "completion", "Hello there", {}),
]


def _generate_request(i, case):
    _, _, adapter, kind, text, extra = case
    source = {"prompt": text} if kind == "completion" else {"messages": [{"role": "user", "content": text}]}
    return {"id": i, "adapter": adapter, "max_tokens": MAX_TOKENS, "temperature": 0.0, **source, **extra}


def generate_reference(model, adapters) -> dict[str, dict]:
    """What `generate --tp 2` answers for every case (its JSON line by case name)."""
    requests = [_generate_request(i, c) for i, c in enumerate(CASES)]
    res = run_cli("generate", "--model", str(model), "--tp", "2", "--requests", "-",
                  *[x for t in (1, 2, 3) for x in ("--adapter", f"{t}={adapters[t]}")],
                  stdin="\n".join(json.dumps(r) for r in requests) + "\n")
    assert res.returncode == 0, res.stderr[-2000:]
    return {case[0]: json.loads(line) for case, line in zip(CASES, res.stdout.splitlines())}


@pytest.fixture(scope="module")
def served(openai_served):
    """The session's OpenAI server (tests/conftest.py), shared with tests/test_bad_input_openai.py."""
    return openai_served


@pytest.fixture(scope="module")
def client(served):
    client = openai.OpenAI(base_url=served[0].openai_url, api_key="unused", max_retries=0)
    warm_openai_client(client, "1")
    return client


def _ask(client, case, stream: bool, **overrides) -> tuple[str, list[int], str, dict]:
    """(text, token ids, finish_reason, usage) of one case through the openai client."""
    _, model, _, kind, text, extra = case
    kwargs = {"model": model or client.models.list().data[0].id,  # the base model is listed first
              "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": stream, "extra_body": {"return_token_ids": True},
              **extra, **overrides}
    if stream:
        kwargs["stream_options"] = {"include_usage": True}
    if kind == "completion":
        result = client.completions.create(prompt=text, **kwargs)
    else:
        result = client.chat.completions.create(messages=[{"role": "user", "content": text}], **kwargs)
    if not stream:
        choice = result.choices[0]
        content = choice.text if kind == "completion" else choice.message.content
        return content, choice.model_extra["token_ids"], choice.finish_reason, result.usage.model_dump()
    pieces, ids, finish, usage, chunks = [], [], None, None, 0
    for chunk in result:
        if not chunk.choices:
            usage = chunk.usage.model_dump()
            continue
        choice = chunk.choices[0]
        pieces.append((choice.text if kind == "completion" else choice.delta.content) or "")
        ids += choice.model_extra["token_ids"]
        finish = choice.finish_reason or finish
        chunks += bool(pieces[-1])
    assert chunks > 1  # token by token
    return "".join(pieces), ids, finish, usage


@pytest.fixture(scope="module")
def loaded(served, client):
    """Adapter a3 loaded at run time as `gamma`."""
    status, body = post_json(served[0], "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "a3"})
    assert status == 200, body
    return next(c for c in client.models.list().data if c.id == "gamma").model_extra["lora_task_id"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_outputs_equal_generate(served, client, loaded, stream):
    """Every case, sent concurrently (adapters mixed in one batch), equals `generate` token for token."""
    expected = served[4]
    with ThreadPoolExecutor(len(CASES)) as pool:
        results = list(pool.map(lambda case: _ask(client, case, stream), CASES))
    for case, (text, ids, finish, usage) in zip(CASES, results):
        want = expected[case[0]]
        assert ids == want["output_ids"], case[0]
        assert text == want["text"], case[0]
        assert usage["completion_tokens"] == len(want["output_ids"]) and usage["prompt_tokens"] > 0
        assert finish == ("length" if len(ids) == MAX_TOKENS and ids[-1] != 2 else "stop")
    assert len({tuple(expected[c[0]]["output_ids"]) for c in CASES[:2]}) == 2  # the adapters really differ


def test_stop_string_cuts_text_and_generation(served, client):
    case = CASES[0]
    full = served[4][case[0]]
    stop = full["text"][len(full["text"]) // 3:][:3]
    want = full["text"][: full["text"].find(stop)]
    stopped_lines = served[0].output().count("outcome=stop_words")
    for stream in (False, True):
        text, ids, finish, _ = _ask(client, case, stream, stop=[stop] if stream else stop)
        assert (text, finish) == (want, "stop")
        assert ids == full["output_ids"][: len(ids)] and len(ids) < MAX_TOKENS  # the engine stopped early
    # the access lines say why they ended (not "cancelled")
    log = served[0].output_matching(f"(?s)(outcome=stop_words.*){{{stopped_lines + 2}}}")
    assert log.count("outcome=stop_words") == stopped_lines + 2, log[-3000:]
    token = full["output_ids"][3]
    want_ids = full["output_ids"][: full["output_ids"].index(token) + 1]
    for stream in (False, True):  # vLLM's stop_token_ids: the stop token ends the output and is its stop_reason
        _, ids, finish, _ = _ask(client, case, stream, extra_body={"return_token_ids": True, "stop_token_ids": [token]})
        assert (ids, finish) == (want_ids, "stop")
    got = client.completions.create(model="1", prompt=case[4], max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"stop_token_ids": [token]})
    assert got.choices[0].model_extra["stop_reason"] == token


def test_models_list_what_was_registered(served, client, loaded):
    cards = {c.id: c for c in client.models.list().data}
    base = served[1].name  # the --model directory is listed by its name, never its host path
    assert list(cards)[0] == base and cards[base].owned_by == "trtllm-bdlora"
    assert {"1", "alpha", "gamma"} <= set(cards)
    assert cards["alpha"].model_extra["lora_task_id"] == 2 and cards["alpha"].model_extra["parent"] == base
    assert cards["alpha"].model_extra["root"] == served[2][2].name  # the directory's name: no host path
    assert client.models.retrieve("alpha").id == "alpha"


def test_unknown_model_is_a_404_openai_error(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-adapter", prompt="Hello", max_tokens=2)
    error = info.value.response.json()["error"]
    assert error["code"] == 404 and error["type"] == "NotFoundError" and "no-such-adapter" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="99", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_loading_is_confined_to_adapter_root(served, client):
    server, _, _, outside, _ = served
    for path in (str(outside), "escape", "../outside", "a1/../../outside"):
        status, payload = post_json(server, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert status == 403 and "outside --adapter-root" in payload["error"]["message"], (path, payload)
    status, payload = post_json(server, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "missing"})
    assert status == 404, payload
    status, payload = post_json(server, "/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": "a3"})
    assert status == 400 and "already been loaded" in payload["error"]["message"]
    assert "evil" not in {c.id for c in client.models.list().data}


def test_adapter_loaded_through_openai_serves_grpc_and_unloads(served, client, loaded):
    server, _, _, _, expected = served
    want = expected["loaded at run time"]
    grpc = grpcclient.InferenceServerClient(server.url)
    try:
        assert infer(grpc, "Hello there", MAX_TOKENS, loaded) == want["text"]
    finally:
        grpc.close()
    status, body = post_json(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert status == 200 and "removed" in body
    unloaded = rf"INFO trtllm_bdlora\.adapters adapter unloaded task_id={loaded}\n"
    log = server.output_matching(unloaded)  # the operator sees both
    assert re.search(rf"INFO trtllm_bdlora\.adapters adapter registered task_id={loaded} source=load dir=\S+a3 ", log), log[-3000:]
    assert re.search(unloaded, log), log[-3000:]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="Hello there", max_tokens=2)
    assert "gamma" not in {c.id for c in client.models.list().data}
    status, body = post_json(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert status == 404, body
    status, body = post_json(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "a3"})
    assert status == 200, body  # the name is free again
    assert client.completions.create(model="gamma", prompt="Hello there", max_tokens=MAX_TOKENS,
                                     temperature=0).choices[0].text == want["text"]


def test_adapter_registered_through_grpc_serves_openai(served, client):
    server, _, adapters, _, _ = served
    grpc = grpcclient.InferenceServerClient(server.url)
    try:
        text = infer(grpc, "Hello there", MAX_TOKENS, 7, converted_adapter(adapters[3], 2))
    finally:
        grpc.close()
    assert "7" in {c.id for c in client.models.list().data}
    got = client.completions.create(model="7", prompt="Hello there", max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].text == text


def test_unload_while_in_use_lets_running_requests_finish(served, client):
    server = served[0]
    status, body = post_json(server, "/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": "a1"})
    assert status == 200, body
    want = client.completions.create(model="1", prompt="Once upon a time", max_tokens=40, temperature=0,
                                     extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]
    stream = client.completions.create(model="busy", prompt="Once upon a time", max_tokens=40, temperature=0,
                                       stream=True, extra_body={"return_token_ids": True})
    ids, unloaded = [], threading.Event()
    for chunk in stream:
        ids += chunk.choices[0].model_extra["token_ids"]
        if not unloaded.is_set():
            status, body = post_json(server, "/v1/unload_lora_adapter", {"lora_name": "busy"})
            assert status == 200, body
            unloaded.set()
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="busy", prompt="Hello", max_tokens=2)
    assert ids == want  # same weights as adapter 1, generated to the end after the unload


def test_vllm_sampling_extensions_equal_the_ensembles_tensorrt_llm_inputs(served, client):
    """top_k, penalties and min_tokens through OpenAI give the tokens the KServe ensemble gives for the same
    TensorRT-LLM sampling inputs (one runtime, one sampler); out-of-range values are 400s."""
    import numpy as np

    settings = {"temperature": 0.8, "top_p": 0.9, "top_k": 5, "seed": 7, "repetition_penalty": 1.3,
                "presence_penalty": 0.7, "frequency_penalty": 0.4, "min_tokens": MAX_TOKENS}
    got = client.completions.create(model="alpha", prompt="Write a poem", max_tokens=MAX_TOKENS,
                                    **{k: settings[k] for k in ("temperature", "top_p", "seed", "presence_penalty",
                                                                "frequency_penalty")},
                                    extra_body={k: settings[k] for k in ("top_k", "repetition_penalty", "min_tokens")})
    types = {"top_k": np.int32, "min_tokens": np.int32, "seed": np.uint64}
    inputs = [("text_input", np.array([[b"Write a poem"]], dtype=object)),
              ("max_tokens", np.array([[MAX_TOKENS]], dtype=np.int32)),
              ("exclude_input_in_output", np.array([[True]])), ("lora_task_id", np.array([[2]], dtype=np.uint64))]
    inputs += [(k, np.array([[v]], dtype=types.get(k, np.float32))) for k, v in settings.items()]
    grpc = grpcclient.InferenceServerClient(served[0].url)
    try:
        tensors = []
        for name, array in inputs:
            tensor = grpcclient.InferInput(name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        want = stream_infer(grpc, "ensemble", tensors).as_numpy("text_output").reshape(-1)[0].decode()  # decoupled
    finally:
        grpc.close()
    assert got.choices[0].text == want and got.usage.completion_tokens == MAX_TOKENS
    plain = client.completions.create(model="alpha", prompt="Write a poem", max_tokens=MAX_TOKENS, temperature=0.8,
                                      top_p=0.9, seed=7)
    assert plain.choices[0].text != want  # the extensions changed the sampling
    for bad, fragment in (({"top_k": -2}, "top_k"), ({"presence_penalty": 2.5}, "presence_penalty"),
                          ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": MAX_TOKENS + 1}, "min_tokens")):
        status, payload = post_json(served[0], "/v1/completions", {"model": "1", "prompt": "Hi", "max_tokens": MAX_TOKENS,
                                                                "temperature": 0.5, **bad})
        assert status == 400 and fragment in payload["error"]["message"], (bad, payload)


def _metric(server, name: str, label: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") and label in line:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {label} not exported")


def test_client_leaving_a_stream_cancels_its_generation(served, client):
    """A streamed request whose client disconnects stops generating within a few steps (not at max_tokens), and
    the server keeps serving."""
    import time

    server = served[0]
    iterations = ("nv_trt_llm_general_metrics", 'general_type="iteration_counter"')
    before = _metric(server, *iterations)
    stream = client.completions.create(model="1", prompt="Hello", max_tokens=240, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 60
    while _metric(server, "nv_trt_llm_request_metrics", 'request_type="active"') and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "nv_trt_llm_request_metrics", 'request_type="active"') == 0
    assert _metric(server, *iterations) - before < 120  # 240 steps had it run to the end
    assert client.completions.create(model="1", prompt="Hello", max_tokens=2, temperature=0).usage.completion_tokens == 2

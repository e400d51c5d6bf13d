"""Log-probs, list prompts, n > 1 and guided decoding through `serve`'s OpenAI API, against independent references:
every returned log-prob (prompt and generated tokens, completions and chat, `prompt_logprobs`) equals a float64
transformers + PEFT computation of the same model and adapter within 1e-4, at TP 1 and TP 3; lm-eval's
`local-completions` model scores a local multiple-choice task (tests/data/lmeval) with the accuracy PEFT's log-probs
give; 100 JSON-schema requests across mixed adapters all validate (jsonschema), and Triton's guided_decoding inputs
constrain `tensorrt_llm`. One server per TP for the whole module."""

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
import torch

from tests.helpers import REPO, make_peft_adapter, make_tiny_llama
from tests.serving_helpers import Server
from tests.serving_helpers import infer as stream_infer

TOL = 1e-4
PROMPTS = ["The capital of France is", "Once upon a time there was"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    model = make_tiny_llama(root / "model", tokenizer=True, heads=9, kv_heads=3, hidden=144)
    adapters = {i: make_peft_adapter(model, root / f"a{i}", seed=70 + i, r=6, nblocks=3) for i in (1, 2)}
    return model, adapters


def _serve(files, tp: int):
    model, adapters = files
    server = Server(model, {"a1:1": adapters[1], 2: adapters[2]}, tp=tp, max_loras=2)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.output()[-3000:]


@pytest.fixture(scope="module")
def served_tp1(files):
    yield from _serve(files, 1)


@pytest.fixture(scope="module")
def served_tp3(files):
    yield from _serve(files, 3)


class Reference:
    """transformers + PEFT in float64: log-softmax of every position's logits, per adapter."""

    def __init__(self, model: Path, adapters: dict[int, Path]):
        from transformers import AutoTokenizer

        self.model_dir, self.adapters, self.models = model, adapters, {}
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def _model(self, adapter: int | None):
        if adapter not in self.models:
            from peft import PeftModel
            from transformers import LlamaForCausalLM

            base = LlamaForCausalLM.from_pretrained(self.model_dir, dtype=torch.float64)
            model = base if adapter is None else PeftModel.from_pretrained(base, self.adapters[adapter])
            self.models[adapter] = model.double().eval()
        return self.models[adapter]

    def logprobs(self, adapter: int | None, ids: list[int]) -> torch.Tensor:
        """[len(ids) - 1, vocab]: row i is the distribution of ids[i + 1]."""
        with torch.no_grad():
            logits = self._model(adapter)(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, -1)[:-1]


@pytest.fixture(scope="module")
def reference(files):
    return Reference(*files)


def _post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.openai_url + path, json=body, timeout=300)


def _check_completion_choice(choice: dict, ref: torch.Tensor, ids: list[int], ks: tuple[int, int], decode, prompt_len: int):
    """`ks`: the top counts of prompt positions (prompt_logprobs, as vLLM echoes them) and of generated ones."""
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) == len(lp["tokens"]) == len(lp["top_logprobs"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"] == [decode(t) for t in ids]
    for i in range(1, len(ids)):
        k = ks[0] if i < prompt_len else ks[1]
        want = float(ref[i - 1, ids[i]])
        assert abs(lp["token_logprobs"][i] - want) < TOL, (i, lp["token_logprobs"][i], want)
        # the token there, then the top k (near-ties may swap which tokens: compare values, and each key's own)
        top = lp["top_logprobs"][i]
        assert abs(top[decode(ids[i])] - want) < TOL
        values, top_ids = torch.topk(ref[i - 1], k + 8)
        candidates = {}
        for t, v in zip([ids[i], *top_ids.tolist()], [want, *values.tolist()]):
            candidates.setdefault(decode(t), []).append(v)
        assert all(any(abs(value - v) < TOL for v in candidates[key]) for key, value in top.items())
        others = sorted((v for key, v in top.items() if key != decode(ids[i]) or len(top) == k), reverse=True)
        assert len(top) in (k, k + 1) and max(abs(a - b) for a, b in zip(others, values[:k].tolist())) < TOL
    assert lp["text_offset"][0] == 0 and lp["text_offset"][prompt_len] == len("".join(lp["tokens"][:prompt_len]))


@pytest.mark.parametrize("tp", [1, 3])
def test_completion_logprobs_match_float64_peft(tp, request, reference):
    server = request.getfixturevalue(f"served_tp{tp}")
    tok = reference.tokenizer
    first, second = tok(PROMPTS[0])["input_ids"], tok(PROMPTS[1])["input_ids"]
    body = {"model": "1", "prompt": [first, second], "echo": True, "logprobs": 3, "prompt_logprobs": 2,
            "max_tokens": 4, "temperature": 0, "return_token_ids": True, "ignore_eos": True}
    res = _post(server, "/completions", body)
    assert res.status_code == 200, res.text
    out = res.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    decode = lambda t: tok.decode([t])  # noqa: E731
    total = 0
    for choice, prompt in zip(out["choices"], [first, second]):
        assert choice["prompt_token_ids"] == prompt and len(choice["token_ids"]) == 4
        ids = prompt + choice["token_ids"]
        ref = reference.logprobs(1, ids)
        assert choice["token_ids"] == ref[len(prompt) - 1 :].argmax(-1).tolist()  # greedy under the adapter
        _check_completion_choice(choice, ref, ids, (2, 3), decode, len(prompt))
        assert choice["text"].startswith(tok.decode(prompt))
        # vLLM's prompt_logprobs: None, then {token id: {logprob, rank, decoded_token}} with the top 2
        plp = choice["prompt_logprobs"]
        assert len(plp) == len(prompt) and plp[0] is None
        for i in range(1, len(prompt)):
            position, row = plp[i], ref[i - 1]
            mine = position[str(prompt[i])]
            assert abs(mine["logprob"] - float(row[prompt[i]])) < TOL
            assert mine["rank"] == int((row > row[prompt[i]]).sum()) + 1
            assert all(abs(e["logprob"] - float(row[int(t)])) < TOL and e["decoded_token"] == decode(int(t))
                       for t, e in position.items())
            top2 = torch.topk(row, 2).values.tolist()
            others = sorted((e["logprob"] for t, e in position.items() if e["rank"] <= 2), reverse=True)
            assert len(position) in (2, 3) and max(abs(a - b) for a, b in zip(others, top2)) < TOL
        total += len(choice["token_ids"])
    assert out["usage"] == {"prompt_tokens": len(first) + len(second), "completion_tokens": total,
                            "total_tokens": len(first) + len(second) + total}
    # the base model's log-probs are another model's: the adapter's are not those
    base = _post(server, "/completions", {**body, "model": None, "prompt": PROMPTS[0], "max_tokens": 0}).json()
    ids = tok(PROMPTS[0])["input_ids"]
    ref_base = reference.logprobs(None, ids)
    got = base["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert len(got) == len(ids) - 1 and base["choices"][0]["text"] == PROMPTS[0]
    assert max(abs(g - float(ref_base[i, ids[i + 1]])) for i, g in enumerate(got)) < TOL
    assert max(abs(g - float(reference.logprobs(1, ids)[i, ids[i + 1]])) for i, g in enumerate(got)) > 1e-2


@pytest.mark.parametrize("tp", [1, 3])
def test_chat_logprobs_with_n_samples_match_float64_peft(tp, request, reference):
    server = request.getfixturevalue(f"served_tp{tp}")
    tok = reference.tokenizer
    body = {"model": "2", "messages": [{"role": "user", "content": "Name a color"}], "logprobs": True,
            "top_logprobs": 2, "max_tokens": 5, "temperature": 1.0, "seed": 5, "n": 2, "return_token_ids": True,
            "ignore_eos": True, "prompt_logprobs": 1}
    out = _post(server, "/chat/completions", body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1], out
    assert out["choices"][0]["token_ids"] != out["choices"][1]["token_ids"]  # two samples
    prompt = out["prompt_token_ids"]
    prompt_ref = reference.logprobs(2, prompt)  # vLLM: chat's prompt_logprobs at the top level
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == len(prompt)
    assert all(abs(out["prompt_logprobs"][i][str(prompt[i])]["logprob"] - float(prompt_ref[i - 1, prompt[i]])) < TOL
               for i in range(1, len(prompt)))
    for choice in out["choices"]:
        ids = choice["token_ids"]
        ref = reference.logprobs(2, prompt + ids)[len(prompt) - 1 :]
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == [tok.decode([t]) for t in ids]
        for row, token, entry in zip(ref, ids, content):
            assert abs(entry["logprob"] - float(row[token])) < TOL
            assert entry["bytes"] == list(entry["token"].encode("utf-8", errors="replace"))
            values = torch.topk(row, 2).values.tolist()
            assert len(entry["top_logprobs"]) == 2
            assert all(abs(t["logprob"] - v) < TOL for t, v in zip(entry["top_logprobs"], values))
    assert out["usage"]["completion_tokens"] == 10
    # streamed: the same tokens and log-probs per choice, and the usage at the end
    chunks = [json.loads(line[6:]) for line in requests.post(
        server.openai_url + "/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=300).text.splitlines() if line.startswith("data: {")]
    streamed = {0: [], 1: []}
    for chunk in chunks:
        for c in chunk["choices"]:
            streamed[c["index"]] += (c["logprobs"] or {"content": []})["content"]
    for choice in out["choices"]:
        assert streamed[choice["index"]] == choice["logprobs"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request (TemplateAPI._encode_pair): trailing spaces move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def test_lm_eval_multiple_choice_accuracy_equals_peft(served_tp3, files, reference, tmp_path):
    model, _ = files
    url = served_tp3.openai_url + "/completions"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
           f"model=a1,base_url={url},tokenizer={model},tokenizer_backend=huggingface,tokenized_requests=True,"
           "num_concurrent=1,max_retries=1", "--tasks", "bdlora_mc", "--include_path", "tests/data/lmeval",
           "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    accuracy = results["results"]["bdlora_mc"]["acc,none"]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_bdlora_mc_*.jsonl")).open()]
    tok = reference.tokenizer
    correct = 0
    for sample in samples:
        scores = []
        for (context, continuation), resp in zip([(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()],
                                                 sample["resps"]):
            ctx, cont = _encode_pair(tok, context, continuation)
            ref = reference.logprobs(1, ctx + cont)
            score = sum(float(ref[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            assert abs(float(resp[0][0]) - score) < TOL * len(cont), (context, continuation, resp, score)
            scores.append(score)
        correct += int(int(np.argmax(scores)) == sample["doc"]["answer"])
    assert len(samples) == 12 and math.isclose(accuracy, correct / len(samples))


def test_json_schema_guided_decoding_across_mixed_adapters(served_tp1):
    def one(i: int) -> dict:
        body = {"model": [None, "1", "2"][i % 3], "max_tokens": 96, "temperature": 1.0, "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}}
        if i % 2:
            body["messages"] = [{"role": "user", "content": f"Describe person {i} as JSON"}]
            return _post(served_tp1, "/chat/completions", body).json()
        return _post(served_tp1, "/completions", {**body, "prompt": f"Person {i} as JSON:"}).json()

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(one, range(100)))
    for out in outputs:
        choice = out["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert choice["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(text), SCHEMA)
    bad = _post(served_tp1, "/completions", {"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text
    loose = _post(served_tp1, "/completions", {"prompt": "An object:", "max_tokens": 64, "seed": 1, "temperature": 1.0,
                                               "response_format": {"type": "json_object"}}).json()["choices"][0]
    assert loose["finish_reason"] != "stop" or isinstance(json.loads(loose["text"]), dict)


def test_triton_guided_decoding_inputs(served_tp1, reference):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(served_tp1.url)
    ids = reference.tokenizer("Code:")["input_ids"]

    def infer(kind: str, guide: str, **extra):
        arrays = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
                  "request_output_len": np.array([[24]], np.int32), "exclude_input_in_output": np.array([[True]], bool),
                  "runtime_top_k": np.array([[5]], np.int32), "seed": np.array([[3]], np.uint64),
                  "guided_decoding_guide_type": np.array([[kind]], dtype=object),
                  "guided_decoding_guide": np.array([[guide]], dtype=object), **extra}
        inputs = []
        for name, value in arrays.items():
            tensor = grpcclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else
                                           {np.int32: "INT32", np.uint64: "UINT64", np.bool_: "BOOL"}[value.dtype.type])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return stream_infer(client, "tensorrt_llm", inputs).as_numpy("output_ids")[0, 0].tolist()  # decoupled

    pattern = "[0-9]{3}-[a-z]{2}"
    text = reference.tokenizer.decode(infer("regex", pattern))
    assert re.fullmatch(pattern, text), text
    schema = json.loads(reference.tokenizer.decode(infer("json_schema", json.dumps(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}),
        request_output_len=np.array([[40]], np.int32))))
    assert isinstance(schema["ok"], bool)
    with pytest.raises(InferenceServerException, match="guided_decoding_guide_type"):
        infer("structural_tag", "{}")


def test_ignored_fields_are_honoured_or_refused(served_tp1, reference):
    base = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    plain = _post(served_tp1, "/completions", {**base, "model": "1"}).json()["choices"][0]["text"]
    stop = plain[3:5]
    assert stop and plain.find(stop) == 3
    cut = _post(served_tp1, "/completions", {**base, "model": "1", "stop": [stop]}).json()["choices"][0]["text"]
    kept = _post(served_tp1, "/completions", {**base, "model": "1", "stop": [stop], "include_stop_str_in_output": True}).json()
    assert cut == plain[:3] and kept["choices"][0]["text"] == plain[:5]
    by_lora = _post(served_tp1, "/completions", {**base, "lora_request": {"lora_name": "a1", "lora_int_id": 1}}).json()
    assert by_lora["choices"][0]["text"] == plain and by_lora["model"] == "a1"
    for body, param in (({**base, "lora_request": {"lora_name": "nope", "lora_int_id": 99}}, "lora_request"),
                        ({**base, "model": "2", "lora_request": {"lora_int_id": 1}}, "lora_request"),
                        ({**base, "tool_choice": "auto"}, "tool_choice"), ({**base, "max_tokens": 0}, "max_tokens"),
                        ({**base, "logprobs": 21}, "logprobs")):
        res = _post(served_tp1, "/completions", body)
        assert res.status_code in (400, 404) and res.json()["error"]["param"] == param, res.text
    assert _post(served_tp1, "/completions", {**base, "tool_choice": "none"}).status_code == 200
    both = _post(served_tp1, "/completions", {**base, "model": "1", "prompt": [PROMPTS[0], PROMPTS[1]]}).json()
    assert [c["text"] for c in both["choices"]][0] == plain and len(both["choices"]) == 2
    # completion_tokens as vLLM counts it: every generated token, the end token included (as in token_ids)
    out = _post(served_tp1, "/completions", {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0,
                                             "return_token_ids": True}).json()
    assert out["usage"]["completion_tokens"] == len(out["choices"][0]["token_ids"])

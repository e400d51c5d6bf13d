"""`serve` against a REAL tritonserver serving the same repository (`fill-model-repo` of one torch build, TP 1): one
table of requests, valid and invalid, over gRPC (unary and streams), HTTP infer and the generate extension, sent to
both; the outputs, the response flags and the status codes must be the same, and ModelMetadata / ModelConfig /
the repository index identical (JSON as Triton writes it), but for host paths, which `serve` shows by their names.
The messages of the errors are printed side by side (DIFF_MESSAGES); the differences that remain are listed in
docs/triton.md with their reasons.

These tests fail, never skip, when the server cannot be had (CI installs it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from tests.helpers import make_peft_adapter, run_cli
from tests.real_triton import Triton, fill_repository, stream, tensor
from tests.serving_helpers import Server

pytestmark = [pytest.mark.route, pytest.mark.serve]  # a real tritonserver (and `serve`)
MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
TRUE = np.array([[True]])
IDS = [6004, 905, 314, 7830]  # "Hello there, how" in smollm2's vocabulary (any ids below 49152 would do)
END = 2


@pytest.fixture(scope="module")
def both(tiny_llama_with_tokenizer, tmp_path_factory):
    """One torch build (TP 1, float16) of the tiny model; `serve` on it and Triton on its repository; an adapter as
    `convert-adapter` writes it for that build."""
    root = tmp_path_factory.mktemp("vs_serve")
    engine = root / "engine"
    res = run_cli("build", "--model", str(tiny_llama_with_tokenizer), "--tp", "1", "--backend", "torch", "--output",
                  str(engine))
    assert res.returncode == 0, res.stderr[-2000:]
    peft = make_peft_adapter(tiny_llama_with_tokenizer, root / "peft", seed=91, r=8)
    res = run_cli("convert-adapter", str(peft), "--output", str(root / "npy"), "--engine-dir", str(engine))
    assert res.returncode == 0, res.stderr[-2000:]
    lora = np.load(root / "npy" / "model.lora_weights.npy"), np.load(root / "npy" / "model.lora_config.npy")
    triton = Triton(fill_repository(engine, root / "repo"), root)
    serve = Server(engine, {}, tp=1)
    try:
        triton.wait_ready()
        serve.wait_ready()
        yield {"triton": (triton.url, triton.http_url), "serve": (serve.url, serve.http_url)}, lora, engine
    finally:
        serve.stop()
        triton.stop()


# ---------------------------------------------------------------------------- the table
@dataclass
class Call:
    name: str
    transport: str  # unary (gRPC ModelInfer) | stream (ModelStreamInfer) | http (infer) | generate | generate_stream
    model: str
    inputs: dict = field(default_factory=dict)  # name -> array; generate: the JSON document
    cancel_after: int | None = None
    request_id: str = ""


def text(prompt="Hello there", max_tokens=6, **extra) -> dict:
    return {"text_input": np.array([[prompt.encode()]], dtype=object), "max_tokens": np.array([[max_tokens]], np.int32),
            **extra}


def core(ids=IDS, max_tokens=6, **extra) -> dict:
    return {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
            "request_output_len": np.array([[max_tokens]], np.int32), "end_id": np.array([[END]], np.int32), **extra}


def pre(query=b"Hello there", **extra) -> dict:
    return {"QUERY": np.array([[query]], dtype=object), "REQUEST_OUTPUT_LEN": np.array([[6]], np.int32), **extra}


def post(ids=IDS, **extra) -> dict:
    return {"TOKENS_BATCH": np.array([[ids]], np.int32), "SEQUENCE_LENGTH": np.array([[len(ids)]], np.int32), **extra}


def table(lora) -> list[Call]:
    weights, config = lora
    nan = weights.copy()
    nan.reshape(-1)[7] = np.nan
    task = {"lora_task_id": np.array([[41]], np.uint64)}
    return [
        # answered
        Call("ensemble", "stream", "ensemble", text(), request_id="e-1"),
        Call("ensemble streaming", "stream", "ensemble", text(stream=TRUE)),
        Call("ensemble excluding the input", "stream", "ensemble", text(exclude_input_in_output=TRUE)),
        Call("ensemble batch of 2", "stream", "ensemble", {
            "text_input": np.array([[b"Hello there"], [b"Once upon a time"]], dtype=object),
            "max_tokens": np.array([[4], [4]], np.int32)}),
        Call("BLS", "stream", "tensorrt_llm_bls", text()),
        Call("BLS streaming", "stream", "tensorrt_llm_bls", text(stream=TRUE)),
        Call("BLS text stop word", "stream", "tensorrt_llm_bls", text(stop_words=np.array([[b"ances"]], dtype=object))),
        Call("tensorrt_llm", "stream", "tensorrt_llm", core()),
        Call("tensorrt_llm streaming", "stream", "tensorrt_llm", core(streaming=TRUE)),
        Call("tensorrt_llm stop word ids", "stream", "tensorrt_llm",
             core(stop_words_list=np.array([[[41759], [1]]], np.int32))),
        Call("tensorrt_llm log probs, token counts", "stream", "tensorrt_llm",
             core(return_log_probs=TRUE, return_num_output_tokens=TRUE, return_num_input_tokens=TRUE)),
        Call("LoRA on first use (ensemble)", "stream", "ensemble", text(lora_weights=weights, lora_config=config, **task)),
        Call("LoRA cached (ensemble)", "stream", "ensemble", text(**task)),
        Call("LoRA cached (tensorrt_llm)", "stream", "tensorrt_llm", core(**task)),
        Call("preprocessing", "unary", "preprocessing", pre(), request_id="p-1"),
        Call("postprocessing", "unary", "postprocessing", post()),
        Call("preprocessing over HTTP", "http", "preprocessing",
             pre(STOP_WORDS_DICT=np.array([[b"there"]], dtype=object)), request_id="h-1"),
        Call("generate, ensemble", "generate", "ensemble", {"text_input": "Hello there", "max_tokens": 6}),
        Call("generate, tensorrt_llm", "generate", "tensorrt_llm",
             {"input_ids": IDS, "input_lengths": len(IDS), "request_output_len": 4}),
        Call("generate_stream, BLS", "generate_stream", "tensorrt_llm_bls",
             {"text_input": "Hello there", "max_tokens": 4, "stream": True}),
        Call("a stream to a non-decoupled model", "stream", "preprocessing", pre()),
        # refused
        Call("unary call to the ensemble", "unary", "ensemble", text()),
        Call("HTTP infer to tensorrt_llm", "http", "tensorrt_llm", core()),
        Call("unknown model", "unary", "nonexistent", pre()),
        Call("missing input (unary)", "unary", "preprocessing", {"QUERY": np.array([[b"Hi"]], dtype=object)}),
        Call("missing input (stream)", "stream", "ensemble", {"text_input": np.array([[b"Hi"]], dtype=object)}),
        Call("unexpected input", "stream", "ensemble", text(random_seed=np.array([[1]], np.uint64))),
        Call("wrong dtype (unary)", "unary", "preprocessing", pre(REQUEST_OUTPUT_LEN=np.array([[6]], np.int64))),
        Call("wrong dtype (stream)", "stream", "ensemble", {"text_input": np.array([[b"Hi"]], dtype=object),
                                                            "max_tokens": np.array([[6.0]], np.float32)}),
        Call("batch over max_batch_size", "unary", "preprocessing", {
            "QUERY": np.array([[b"Hi"]] * 65, dtype=object), "REQUEST_OUTPUT_LEN": np.array([[2]] * 65, np.int32)}),
        Call("wrong shape (unary)", "unary", "preprocessing", {"QUERY": np.array([b"Hi"], dtype=object),
                                                                "REQUEST_OUTPUT_LEN": np.array([[6]], np.int32)}),
        Call("wrong shape (stream)", "stream", "ensemble",
             {"text_input": np.array([[b"a", b"b"]], dtype=object), "max_tokens": np.array([[6]], np.int32)}),
        Call("bad UTF-8 (unary)", "unary", "preprocessing", pre(b"caf\xe9 \xff")),
        Call("bad UTF-8 (stream)", "stream", "ensemble", {"text_input": np.array([[b"\xff\xfe"]], dtype=object),
                                                          "max_tokens": np.array([[4]], np.int32)}),
        Call("out-of-vocabulary ids (tensorrt_llm)", "stream", "tensorrt_llm", core([5, 49152])),
        Call("out-of-vocabulary ids (postprocessing)", "unary", "postprocessing", post([5, 49152])),
        Call("oversize text (HTTP)", "http", "preprocessing", pre(b"x" * 2_000_000)),
        Call("oversize text (generate)", "generate", "ensemble", {"text_input": "x" * 2_000_000, "max_tokens": 4}),
        Call("max_tokens 0 (generate)", "generate", "ensemble", {"text_input": "Hi", "max_tokens": 0}),
        Call("generate with many responses", "generate", "ensemble", {"text_input": "Hi", "max_tokens": 3, "stream": True}),
        Call("NaN in lora_weights", "stream", "ensemble",
             text(lora_weights=nan, lora_config=config, lora_task_id=np.array([[42]], np.uint64))),
        Call("malformed lora_config", "stream", "tensorrt_llm",
             core(lora_weights=weights, lora_config=config[:, :1, :2].copy(), lora_task_id=np.array([[43]], np.uint64))),
        Call("lora_weights without lora_config", "stream", "tensorrt_llm",
             core(lora_weights=weights, lora_task_id=np.array([[44]], np.uint64))),
        Call("lora_weights of another dtype", "stream", "tensorrt_llm",
             core(lora_weights=weights.astype(np.float32), lora_config=config, lora_task_id=np.array([[45]], np.uint64))),
        Call("unknown lora_task_id", "stream", "tensorrt_llm", core(lora_task_id=np.array([[46]], np.uint64))),
        Call("beam_width 2", "stream", "tensorrt_llm", core(beam_width=np.array([[2]], np.int32))),
        Call("cancelled stream (tensorrt_llm)", "stream", "tensorrt_llm", core(max_tokens=200, streaming=TRUE),
             cancel_after=2),
        Call("cancelled stream (BLS)", "stream", "tensorrt_llm_bls", text(max_tokens=200, stream=TRUE), cancel_after=2),
    ]


# ---------------------------------------------------------------------------- one outcome, comparable
def _arrays(outputs: dict) -> dict:
    return {k: (str(v.dtype), list(v.shape), v.reshape(-1).tolist()) for k, v in sorted(outputs.items())}


def run(call: Call, urls: tuple[str, str]) -> dict:
    """status (gRPC code name, HTTP status, or None for a stream), responses (outputs and final flags), error."""
    grpc_url, http_url = urls
    if call.transport == "stream":
        outcome = stream(grpc_url, call.model, call.inputs, request_id=call.request_id, cancel_after=call.cancel_after)
        return {"status": None, "error": outcome.error,
                "responses": [(_arrays(o), final, p, i) for (o, final), p, i in
                              zip(outcome.responses, outcome.parameters, outcome.ids)]}
    if call.transport in ("generate", "generate_stream"):
        r = requests.post(f"http://{http_url}/v2/models/{call.model}/{call.transport}", json=call.inputs, timeout=300)
        docs = [r.json()] if call.transport == "generate" else \
            [json.loads(line[len("data: "):]) for line in r.text.splitlines() if line.startswith("data: ")]
        errors = [d.pop("error") for d in docs if "error" in d]
        return {"status": r.status_code, "responses": [d for d in docs if d], "error": errors[0] if errors else None}
    module = grpcclient if call.transport == "unary" else httpclient
    client = module.InferenceServerClient(grpc_url if call.transport == "unary" else http_url)
    try:
        result = client.infer(call.model, [tensor(k, v, module) for k, v in call.inputs.items()],
                              request_id=call.request_id)
        response = result.get_response()
        if module is grpcclient:
            names, head = [o.name for o in response.outputs], json_format.MessageToDict(response)
        else:
            names, head = [o["name"] for o in response["outputs"]], dict(response)
        head = {k: v for k, v in head.items() if k not in ("outputs", "rawOutputContents")}  # id, model, parameters
        return {"status": "OK" if module is grpcclient else 200, "error": None,
                "responses": [(_arrays({n: result.as_numpy(n) for n in names}), head)]}
    except InferenceServerException as err:
        return {"status": str(err.status()).removeprefix("StatusCode."), "responses": [], "error": err.message()}
    finally:
        client.close()


@pytest.fixture(scope="module")
def outcomes(both):
    urls, lora, _ = both
    calls = table(lora)
    assert len(calls) >= 30 and len({c.name for c in calls}) == len(calls)
    return [(call, run(call, urls["serve"]), run(call, urls["triton"])) for call in calls]


def test_the_table_is_answered_alike(outcomes):
    """Same status, same responses (outputs and final flags), an error from both or from neither."""
    messages, differ = [], []
    for call, served, real in outcomes:
        messages.append({"request": call.name, "status": real["status"], "triton": real["error"], "serve": served["error"]})
        if (served["status"], served["responses"], served["error"] is None) != \
                (real["status"], real["responses"], real["error"] is None):
            differ.append((call.name, {k: served[k] for k in ("status", "error")}, {k: real[k] for k in ("status", "error")},
                           served["responses"][:2], real["responses"][:2]))
    print("DIFF_MESSAGES", json.dumps(messages, indent=1))
    assert not differ, json.dumps(differ, indent=1, default=str)[:6000]
    # the same words, but where a step of Triton's ensemble failed: Triton names the ensemble and the step's input
    # ("in ensemble 'ensemble', QUERY ..."), serve the input the client sent (text_input); docs/triton.md
    worded = [m for m in messages if m["triton"] != m["serve"] and not str(m["triton"]).startswith("in ensemble 'ensemble', ")]
    assert not worded, json.dumps(worded, indent=1)
    answered = sum(1 for _, _, real in outcomes if real["error"] is None)
    assert answered >= 15 and len(outcomes) - answered >= 15  # the table holds both kinds


def test_metadata_config_and_index_are_identical(both):
    urls, _, engine = both
    docs = {}
    for side, (grpc_url, http_url) in urls.items():
        client = grpcclient.InferenceServerClient(grpc_url)
        doc = {"index": requests.post(f"http://{http_url}/v2/repository/index", json={}, timeout=30).json()}
        for model in MODELS:
            doc[f"{model} metadata (HTTP)"] = requests.get(f"http://{http_url}/v2/models/{model}", timeout=30).json()
            doc[f"{model} config (HTTP)"] = requests.get(f"http://{http_url}/v2/models/{model}/config", timeout=30).json()
            doc[f"{model} metadata (gRPC)"] = json_format.MessageToDict(client.get_model_metadata(model))
            doc[f"{model} config (gRPC)"] = json_format.MessageToDict(client.get_model_config(model).config)
        client.close()
        docs[side] = doc
    for key in docs["triton"]:
        assert _without_newer_fields(docs["serve"][key]) == _paths_as_names(docs["triton"][key], str(engine)), key


def _paths_as_names(doc, path: str):
    """Triton shows the parameters as config.pbtxt holds them, host paths included (gpt_model_path, tokenizer_dir);
    `serve` shows a directory by its name, never its host path (the edge: errors.hide_path)."""
    if isinstance(doc, dict):
        return {k: _paths_as_names(v, path) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_paths_as_names(v, path) for v in doc]
    return path.rsplit("/", 1)[-1] if doc == path else doc


def _without_newer_fields(doc):
    """ensemble_scheduling.max_inflight_requests: a field of the ModelConfig protobuf newer than Triton 2.51 (in the
    tritonclient serve uses; Triton 26.07 writes it), so 2.51 never writes it."""
    if isinstance(doc, dict):
        return {k: _without_newer_fields(v) for k, v in doc.items()
                if k not in ("max_inflight_requests", "maxInflightRequests")}
    return [_without_newer_fields(v) for v in doc] if isinstance(doc, list) else doc

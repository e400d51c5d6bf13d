"""The repository `fill-model-repo` writes for a `build --backend torch` engine, served by a REAL tritonserver (2.51 from
the PyPI wheel nvidia-pytriton, `.ci/install-triton`) at TP 1 (started by `launch-triton`, auto-completion off as
upstream launches it) and TP 2 (auto-completion on): every model loads; the tensorrt_llm model (Python backend over
the torch engine, its second rank started by the model), the ensemble and the BLS answer over gRPC and HTTP with
the tokens `generate` computes for the same prompt ids, LoRA adapters on first use and cached, stop words, excluded
input, `trtllm-bdlora client`; Triton's own rules hold (unary calls to decoupled models refused); bad requests get
client error codes; cancelled streams stop generating; a dying rank fails its requests and stops the server.

These tests fail, never skip, when the server cannot be had (CI installs it)."""

import json
import re
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.helpers import make_peft_adapter, run_cli
from tests.real_triton import Triton, error_probe_repository, fill_repository, generate, stream, tensor
from trtllm_bdlora.errors import STATUS, ErrorKind
from trtllm_bdlora.trtllm.triton_python import TRITON_ERROR_CODES

pytestmark = [pytest.mark.route, pytest.mark.serve]  # a real tritonserver (and `serve`)
PROMPTS = ["Hello there", "The capital of France is", "Once upon a time"]
MAX_TOKENS = 10
TASK = 5  # the LoRA task id requests register
END = 2  # the tokenizer's eos


@pytest.fixture(scope="module")
def build(tiny_llama_with_tokenizer, tmp_path_factory):
    """Torch builds of a tiny random Llama (smollm2's tokenizer) at TP 1 and 2, and a BD-LoRA adapter whose weights are
    fp16-exact, as PEFT files (for `generate`) and as `convert-adapter --tp N` output (sent with requests)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("real_triton")
    model = tiny_llama_with_tokenizer
    peft = make_peft_adapter(model, root / "peft", seed=77, r=16)
    weights = peft / "adapter_model.safetensors"
    save_file({k: v.half().float() for k, v in load_file(weights).items()}, weights)
    engines, loras = {}, {}
    for tp in (1, 2):
        res = run_cli("build", "--model", str(model), "--tp", str(tp), "--backend", "torch", "--output", str(root / f"e{tp}"))
        assert res.returncode == 0, res.stderr[-2000:]
        engines[tp] = root / f"e{tp}"
        res = run_cli("convert-adapter", str(peft), "--output", str(root / f"npy{tp}"), "--engine-dir", str(engines[tp]))
        assert res.returncode == 0, res.stderr[-2000:]
        loras[tp] = (np.load(root / f"npy{tp}" / "model.lora_weights.npy"), np.load(root / f"npy{tp}" / "model.lora_config.npy"))
    return root, model, peft, engines, loras


@pytest.fixture(scope="module")
def tokenizer(build):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build[1])


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def triton(request, build):
    root, _, _, engines, _ = build
    tp = request.param
    repo = fill_repository(engines[tp], root / f"repo{tp}")
    server = Triton(repo, root, auto_complete=tp == 2, more_repos=(error_probe_repository(root / f"probe{tp}"),))
    try:
        server.wait_ready()
        yield tp, server
    finally:
        server.stop()


_references: dict[int, dict] = {}


@pytest.fixture
def reference(triton, build, tokenizer):
    """`generate --tp N` on the same engine directory: generated ids (end id dropped) per (adapter, prompt)."""
    tp = triton[0]
    if tp not in _references:
        _, _, peft, engines, _ = build
        reqs = [{"id": f"{a}-{i}", "adapter": a, "prompt_ids": tokenizer.encode(p), "max_tokens": MAX_TOKENS}
                for a in (None, TASK) for i, p in enumerate(PROMPTS)]
        res = run_cli("generate", "--model", str(engines[tp]), "--tp", str(tp), "--adapter", f"{TASK}={peft}",
                      "--requests", "-", stdin="\n".join(json.dumps(r) for r in reqs) + "\n")
        assert res.returncode == 0, res.stderr[-2000:]
        out = {o["id"]: o["output_ids"] for o in map(json.loads, res.stdout.splitlines())}
        _references[tp] = {k: v[:-1] if v and v[-1] == END else v for k, v in out.items()}
        assert _references[tp][f"{TASK}-0"] != _references[tp]["None-0"]  # the adapter changes the tokens
    return _references[tp]


def core_inputs(ids, max_tokens=MAX_TOKENS, **extra):
    """inflight_batcher_llm_client.py's inputs."""
    values = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
              "request_output_len": np.array([[max_tokens]], np.int32), "end_id": np.array([[END]], np.int32),
              "pad_id": np.array([[END]], np.int32), "beam_width": np.array([[1]], np.int32),
              "runtime_top_k": np.array([[1]], np.int32), "streaming": np.array([[False]])}
    values.update(extra)
    return values


def text_inputs(prompt, max_tokens=MAX_TOKENS, **extra):
    """end_to_end_grpc_client.py's inputs (ensemble and BLS)."""
    values = {"text_input": np.array([[prompt]], dtype=object), "max_tokens": np.array([[max_tokens]], np.int32),
              "stream": np.array([[False]]), "beam_width": np.array([[1]], np.int32)}
    values.update(extra)
    return values


def text_of(outcome) -> str:
    assert outcome.error is None, outcome.error
    return "".join(t.decode() for t in outcome.joined("text_output"))


TRUE = np.array([[True]])


# ---------------------------------------------------------------------------- loading
def test_every_model_loads(triton):
    tp, server = triton
    index = {m["name"]: m["state"] for m in httpclient.InferenceServerClient(server.http_url).get_model_repository_index()}
    assert index == dict.fromkeys(("ensemble", "postprocessing", "preprocessing", "tensorrt_llm", "tensorrt_llm_bls",
                                   "error_probe"), "READY")  # the five, and the error probe of another repository
    client = grpcclient.InferenceServerClient(server.url)
    core = client.get_model_config("tensorrt_llm").config
    assert core.backend == "python" and core.model_transaction_policy.decoupled
    assert client.get_model_config("ensemble").config.model_transaction_policy.decoupled  # a decoupled step
    assert core.parameters["gpt_model_path"].string_value.endswith(f"e{tp}")


# ---------------------------------------------------------------------------- outputs equal generate
def test_core_model_equals_generate_streaming_and_not(triton, reference, tokenizer):
    url, http_url = triton[1].url, triton[1].http_url
    for i, prompt in enumerate(PROMPTS):
        ids, want = tokenizer.encode(prompt), reference[f"None-{i}"]
        whole = stream(url, "tensorrt_llm", core_inputs(ids))
        assert whole.error is None and len(whole.responses) == 1 and whole.responses[0][1]  # one final data response
        assert whole.joined("output_ids") == ids + want
        assert whole.joined("sequence_length") == [len(ids + want)]
        streamed = stream(url, "tensorrt_llm", core_inputs(ids, streaming=TRUE))
        assert [len(out["output_ids"].reshape(-1)) for out in streamed.outputs] == [1] * len(want)  # a token each
        assert streamed.joined("output_ids") == want and streamed.responses[-1][1]
        excluded = stream(url, "tensorrt_llm", core_inputs(ids, exclude_input_in_output=TRUE))
        assert excluded.joined("output_ids") == want
        doc = {"input_ids": ids, "input_lengths": len(ids), "request_output_len": MAX_TOKENS, "end_id": END}
        status, docs = generate(http_url, "tensorrt_llm", doc)  # over HTTP: the generate extension
        assert status == 200 and np.array(docs[0]["output_ids"]).reshape(-1).tolist() == ids + want, docs
        status, events = generate(http_url, "tensorrt_llm", {**doc, "streaming": True}, streaming=True)
        assert status == 200 and [t for e in events for t in np.array(e.get("output_ids", [])).reshape(-1).tolist()] == want


def test_ensemble_and_bls_equal_generate_over_grpc_and_http(triton, reference, tokenizer):
    server = triton[1]
    for i, prompt in enumerate(PROMPTS):
        ids, want = tokenizer.encode(prompt), reference[f"None-{i}"]
        full, generated = tokenizer.decode(ids + want), tokenizer.decode(want)
        for model in ("ensemble", "tensorrt_llm_bls"):
            assert text_of(stream(server.url, model, text_inputs(prompt))) == full, model
            assert text_of(stream(server.url, model, text_inputs(prompt, exclude_input_in_output=TRUE))) == generated
            status, docs = generate(server.http_url, model, {"text_input": prompt, "max_tokens": MAX_TOKENS})
            assert status == 200 and docs[0]["text_output"] == full, (model, docs)
        streamed = stream(server.url, "ensemble", text_inputs(prompt, stream=TRUE))
        assert len(streamed.outputs) == len(want) and text_of(streamed) == generated
        status, events = generate(server.http_url, "tensorrt_llm_bls", {"text_input": prompt, "max_tokens": MAX_TOKENS,
                                                                        "stream": True}, streaming=True)
        assert status == 200 and "".join(e["text_output"] for e in events) == generated


def test_lora_on_first_use_then_cached(triton, reference, build, tokenizer):
    tp, server = triton
    weights, config = build[4][tp]
    task = {"lora_task_id": np.array([[TASK]], np.uint64)}
    unknown = stream(server.url, "tensorrt_llm", core_inputs(tokenizer.encode(PROMPTS[0]),
                                                             lora_task_id=np.array([[TASK + 1]], np.uint64)))
    assert unknown.error == f"LoRA task {TASK + 1} not found in cache. Please send LoRA weights with request"
    # first use through the ensemble: preprocessing checks the adapter for the engine's TP, tensorrt_llm registers it
    first = stream(server.url, "ensemble", text_inputs(PROMPTS[0], lora_weights=weights, lora_config=config, **task))
    assert text_of(first) == tokenizer.decode(tokenizer.encode(PROMPTS[0]) + reference[f"{TASK}-0"])
    ids = tokenizer.encode(PROMPTS[1])
    cached = stream(server.url, "tensorrt_llm", core_inputs(ids, **task))
    assert cached.joined("output_ids") == ids + reference[f"{TASK}-1"]
    bls = stream(server.url, "tensorrt_llm_bls", text_inputs(PROMPTS[2], exclude_input_in_output=TRUE, **task))
    assert text_of(bls) == tokenizer.decode(reference[f"{TASK}-2"])
    status, docs = generate(server.http_url, "ensemble", {"text_input": PROMPTS[2], "max_tokens": MAX_TOKENS,
                                                          "lora_task_id": TASK, "exclude_input_in_output": True})
    assert status == 200 and docs[0]["text_output"] == tokenizer.decode(reference[f"{TASK}-2"])


def test_the_client_command_against_real_triton(triton, reference, build, tokenizer):
    """`trtllm-bdlora client` (issue 22 defect 1) against the decoupled ensemble: with and without --stream, an adapter
    sent on first use from --adapter-dir (the server does not know task TASK + 2), then cached."""
    tp, server = triton
    peft = build[2]
    base = ["client", "--url", server.url, "--text", PROMPTS[0], "--max-tokens", str(MAX_TOKENS)]
    for extra in ((), ("--stream",)):
        res = run_cli(*base, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.removesuffix("\n") == tokenizer.decode(reference["None-0"]), extra
    lora = ("--adapter", str(TASK + 2), "--adapter-dir", str(peft), "--tp", str(tp))
    for extra in ((), ("--stream",)):  # first use: refused without weights, then sent converted; then cached
        res = run_cli(*base, *lora, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.removesuffix("\n") == tokenizer.decode(reference[f"{TASK}-0"]), extra


def test_stop_words_and_excluded_input(triton, reference, tokenizer):
    url = triton[1].url
    want = reference["None-1"]

    def usable(k):  # a token whose text is that one token, first seen at k, and not inside the text before it
        word = tokenizer.decode(want[k])
        return (tokenizer.encode(word, add_special_tokens=False) == [want[k]] and word.strip()
                and want[k] not in want[:k] and word not in tokenizer.decode(want[:k]))

    k = next(k for k in range(2, len(want)) if usable(k))
    ids = tokenizer.encode(PROMPTS[1])
    stop_list = np.array([[[want[k]], [1]]], np.int32)
    core = stream(url, "tensorrt_llm", core_inputs(ids, stop_words_list=stop_list))
    assert core.joined("output_ids") == ids + want[: k + 1]  # the stop word ends the sequence and stays in it
    word = np.array([[tokenizer.decode(want[k])]], dtype=object)
    for model in ("ensemble", "tensorrt_llm_bls"):
        stopped = stream(url, model, text_inputs(PROMPTS[1], stop_words=word, exclude_input_in_output=TRUE))
        assert text_of(stopped) == tokenizer.decode(want[: k + 1]), model


# ---------------------------------------------------------------------------- Triton's rules
def test_triton_refuses_unary_calls_to_decoupled_models_and_flags_finals_as_upstream(triton, tokenizer):
    server = triton[1]
    values = text_inputs(PROMPTS[0], 2)
    with pytest.raises(InferenceServerException) as grpc_error:
        grpcclient.InferenceServerClient(server.url).infer("ensemble", [tensor(k, v) for k, v in values.items()])
    assert grpc_error.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as http_error:
        httpclient.InferenceServerClient(server.http_url).infer(
            "tensorrt_llm_bls", [tensor(k, v, httpclient) for k, v in values.items()])
    assert http_error.value.status() == "501"
    # the core model and the ensemble flag their last data response final; the BLS sends an empty final after it
    core = stream(server.url, "tensorrt_llm", core_inputs(tokenizer.encode(PROMPTS[0]), 3, streaming=TRUE))
    assert [final for _, final in core.responses] == [False, False, True]
    ensemble = stream(server.url, "ensemble", text_inputs(PROMPTS[0], 3, stream=TRUE))
    assert [final for _, final in ensemble.responses] == [False, False, True]
    bls = stream(server.url, "tensorrt_llm_bls", text_inputs(PROMPTS[0], 3, stream=TRUE))
    assert [(bool(out), final) for out, final in bls.responses] == [(True, False)] * 3 + [(False, True)]


def test_bad_requests_get_client_errors(triton, tokenizer):
    server = triton[1]
    client = grpcclient.InferenceServerClient(server.url)
    bad_utf8 = [tensor("QUERY", np.array([[b"\xff\xfe"]], dtype=object)),
                tensor("REQUEST_OUTPUT_LEN", np.array([[4]], np.int32))]
    with pytest.raises(InferenceServerException) as err:
        client.infer("preprocessing", bad_utf8)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "QUERY is not valid UTF-8" in err.value.message()
    huge = {"QUERY": np.array([[b"x" * 2_000_000]], dtype=object), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}
    with pytest.raises(InferenceServerException) as err:
        httpclient.InferenceServerClient(server.http_url).infer(
            "preprocessing", [tensor(k, v, httpclient) for k, v in huge.items()])
    assert err.value.status() == "400" and "refused before tokenizing" in err.value.message()
    oov = stream(server.url, "tensorrt_llm", core_inputs([5, 49152]))
    assert oov.error == "input_ids must lie in [0, 49152)"
    status, docs = generate(server.http_url, "ensemble", {"text_input": "Hi", "max_tokens": 0})
    # Triton's ensemble names the step's input and the ensemble (serve names the client's input: docs/triton.md)
    assert status == 400 and docs[0]["error"] == "in ensemble 'ensemble', request_output_len must be >= 1, got 0"


# the status Triton gives each TritonError code (its grpc_utils / http_server mapping; checked here on 2.51)
TRITON_STATUS = {"INVALID_ARG": ("INVALID_ARGUMENT", 400), "NOT_FOUND": ("NOT_FOUND", 404), "ALREADY_EXISTS": ("ALREADY_EXISTS", 400),
                 "UNAVAILABLE": ("UNAVAILABLE", 503), "UNSUPPORTED": ("UNIMPLEMENTED", 501), "INTERNAL": ("INTERNAL", 500)}


def test_every_error_kind_reaches_clients_with_its_status(triton):
    """The production Python models answer an error of each kind (errors.ErrorKind) with the TritonError code of one
    table (triton_python.TRITON_ERROR_CODES): a real Triton reports it with the kind's gRPC code and HTTP status
    (errors.STATUS) wherever Triton has one (issue 22 defect 2: every error was INTERNAL / 500)."""
    server = triton[1]
    grpc_client, http_client = grpcclient.InferenceServerClient(server.url), httpclient.InferenceServerClient(server.http_url)
    for index, kind in enumerate(ErrorKind):
        values = {"KIND": np.array([index], np.int32)}
        with pytest.raises(InferenceServerException) as grpc_error:
            grpc_client.infer("error_probe", [tensor(k, v) for k, v in values.items()])
        with pytest.raises(InferenceServerException) as http_error:
            http_client.infer("error_probe", [tensor(k, v, httpclient) for k, v in values.items()])
        seen = (grpc_error.value.status().removeprefix("StatusCode."), int(http_error.value.status()))
        assert seen == TRITON_STATUS[TRITON_ERROR_CODES[kind]], (kind, seen)
        ours = (STATUS[kind].grpc, STATUS[kind].http)
        assert seen == ours or ours not in TRITON_STATUS.values(), (kind, seen)  # the kind's own status where Triton has it
        assert grpc_error.value.message() == f"an error of kind {kind.value}"


def _access_line(server: Triton, request_id: str, timeout: float = 60) -> dict:
    """The tensorrt_llm access line of a request id in the server's log (logs.py's key=value format)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in server.output().splitlines():
            if f" id={request_id} " in line and "trtllm_bdlora.access" in line:
                return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))
        time.sleep(0.5)
    raise AssertionError(f"no access line for {request_id}: {server.output()[-3000:]}")


def test_cancelled_streams_stop_generating(triton, tokenizer):
    """A client that cancels its stream makes the tensorrt_llm request leave the batch, directly and through the BLS
    (issue 22 defect 5: the BLS's child ran on after its client left)."""
    server = triton[1]
    ids, most = tokenizer.encode(PROMPTS[0]), 250  # the model's context is 256 positions
    for model, values in (("tensorrt_llm", core_inputs(ids, most, streaming=TRUE)),
                          ("tensorrt_llm_bls", text_inputs(PROMPTS[0], most, stream=TRUE))):
        # requests beside it make each step slower, so that a request nobody cancels would be far from done
        beside = [threading.Thread(target=stream, args=(server.url, "tensorrt_llm", core_inputs(ids, most)))
                  for _ in range(3)]
        for thread in beside:
            thread.start()
        request_id = f"cancel-{model}-{time.time_ns()}"
        outcome = stream(server.url, model, values, request_id=request_id, cancel_after=2)
        assert outcome.error is None and len(outcome.responses) == 2
        line = _access_line(server, request_id)
        assert line["model"] == "tensorrt_llm" and line["outcome"] == "cancelled", line
        assert int(line["tokens_out"]) < most // 2, line
        for thread in beside:
            thread.join()


def test_a_dying_rank_fails_its_requests_and_stops_the_server(triton, tokenizer):
    """As `serve` does: pending requests get an error, then the server exits (each server's last test). At TP 1 the
    model runs in its own process alone; at TP 2 it started rank 1, which is killed here."""
    tp, server = triton
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "trtllm_bdlora" in p.cmdline() and "serve" in p.cmdline()]
    assert len(workers) == tp - 1, workers  # rank 0 is the tensorrt_llm model's own process
    if tp == 1:
        return
    results: list = []
    responding = threading.Event()
    pending = threading.Thread(target=lambda: results.append(stream(server.url, "tensorrt_llm", core_inputs(
        tokenizer.encode(PROMPTS[0]), 250, streaming=TRUE), responding=responding)))
    pending.start()
    assert responding.wait(60)  # the request is running (its first token is out; 249 more to go)
    workers[0].send_signal(signal.SIGKILL)
    pending.join(120)
    # as `serve` answers a lost rank (engine/runtime.py): UNAVAILABLE, retryable elsewhere
    assert results and results[0].error is not None and results[0].error.startswith("server unavailable: "), results
    server.proc.wait(120)  # the model stopped the server
    assert "trtllm-bdlora tensorrt_llm: error: rank 1" in server.output()

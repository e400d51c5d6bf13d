"""The five inflight_batcher_llm models of `serve --tp 2` driven with tritonclient (gRPC and HTTP) the way
NVIDIA's client scripts call them: same input names, dtypes, shapes, optional inputs present. References are
independent: `generate` for token ids, Hugging Face transformers for logits and penalised greedy decoding."""

import json
import math
import queue

import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.helpers import REPO, run_cli
from tests.serving_helpers import DecoupledAware
from trtllm_bdlora.serving.repository.spec import DEFAULTS

UPSTREAM = json.loads((REPO / "tests" / "data" / "upstream_inflight_batcher_llm.json").read_text())["models"]
PROMPTS = ["Hello there", "The capital of France is", "Once upon a time"]


# ---------------------------------------------------------------------------- clients, as the scripts build inputs
def tensor(name, array, protocol="grpc"):
    module = grpcclient if protocol == "grpc" else httpclient
    t = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def tensors(values: dict, protocol="grpc"):
    return [tensor(k, v, protocol) for k, v in values.items()]


def ensemble_inputs(prompt, max_tokens, **extra):
    """end_to_end_grpc_client.py's inputs (batch 1)."""
    values = {"text_input": np.array([[prompt]], dtype=object), "max_tokens": np.array([[max_tokens]], np.int32),
              "stream": np.array([[False]], bool), "beam_width": np.array([[1]], np.int32),
              "temperature": np.array([[1.0]], np.float32), "exclude_input_in_output": np.array([[False]], bool)}
    values.update(extra)
    return values


def core_inputs(ids, max_tokens, end_id, pad_id, streaming=False, **extra):
    """inflight_batcher_llm_client.py's inputs."""
    values = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
              "request_output_len": np.array([[max_tokens]], np.int32), "beam_width": np.array([[1]], np.int32),
              "temperature": np.array([[1.0]], np.float32), "streaming": np.array([[streaming]], bool),
              "end_id": np.array([[end_id]], np.int32), "pad_id": np.array([[pad_id]], np.int32),
              "runtime_top_k": np.array([[1]], np.int32), "runtime_top_p": np.array([[0.0]], np.float32)}
    values.update(extra)
    return values


def stream(client, model, values, timeout=300):
    """All responses of one decoupled request (ModelStreamInfer), as dicts of numpy outputs."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, tensors(values), enable_empty_final_response=True)
        out = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            names = [o.name for o in response.outputs]
            if names:
                out.append({n: result.as_numpy(n) for n in names})
            if response.parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()


@pytest.fixture(scope="module")
def served(triton_served):
    return triton_served


@pytest.fixture(scope="module")
def grpc_client(served):
    """Decoupled models (tensorrt_llm, ensemble, BLS) answer streams only, as in Triton: `infer` streams to them."""
    c = grpcclient.InferenceServerClient(served[0].url)
    yield DecoupledAware(c, url=served[0].url)
    c.close()


@pytest.fixture(scope="module")
def http_client(served):
    """Decoupled models answer HTTP through the generate extension only, as in Triton: `infer` uses it for them."""
    c = httpclient.InferenceServerClient(served[0].http_url)
    yield DecoupledAware(c, served[0].http_url)
    c.close()


@pytest.fixture(scope="module")
def tokenizer(served):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served[1])


@pytest.fixture(scope="module")
def hf_model(served):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(served[1], torch_dtype=torch.float32).eval()


# ---------------------------------------------------------------------------- interface
def test_every_upstream_input_and_output_is_served_alike(served, grpc_client, http_client):
    values = {**DEFAULTS, "lora_weights_data_type": "TYPE_FP16"}
    for model, facts in UPSTREAM.items():
        grpc_config = grpc_client.get_model_config(model).config
        http_config = http_client.get_model_config(model)
        meta = grpc_client.get_model_metadata(model)
        served_inputs = {i.name: (grpcclient.model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional)
                         for i in grpc_config.input}
        http_inputs = {i["name"]: (i["data_type"], [int(d) for d in i["dims"]], i.get("optional", False))
                       for i in http_config["input"]}
        meta_inputs = {i.name: (i.datatype, list(i.shape)) for i in meta.inputs}
        for name, dtype, dims, optional in facts["inputs"]:
            dtype = values[dtype[2:-1]] if dtype.startswith("${") else dtype
            assert served_inputs.get(name) == (dtype, dims, optional), (model, name)
            assert http_inputs.get(name) == (dtype, dims, optional), (model, name)
            assert meta_inputs.get(name) == (dtype.replace("TYPE_", "").replace("STRING", "BYTES"), [-1, *dims])
        served_outputs = {o.name: (grpcclient.model_config_pb2.DataType.Name(o.data_type), list(o.dims))
                          for o in grpc_config.output}
        for name, dtype, dims in facts["outputs"]:
            dtype = values[dtype[2:-1]] if dtype.startswith("${") else dtype
            assert served_outputs.get(name) == (dtype, dims), (model, name)
        assert grpc_client.is_model_ready(model) and http_client.is_model_ready(model)
    index = {m["name"]: m["state"] for m in http_client.get_model_repository_index()}
    assert index == {m: "READY" for m in UPSTREAM}
    assert grpc_client.get_model_config("tensorrt_llm").config.model_transaction_policy.decoupled


# ---------------------------------------------------------------------------- semantics
@pytest.fixture(scope="module")
def converted(served, tmp_path_factory):
    """A BD-LoRA adapter whose weights are fp16-exact (scaling 2), as PEFT files and as convert-adapter --tp 2 output."""
    from safetensors.torch import load_file, save_file

    from tests.helpers import make_peft_adapter

    root = tmp_path_factory.mktemp("conv")
    peft_dir = make_peft_adapter(served[1], root / "peft", seed=77, r=16, alpha=32)
    weights = peft_dir / "adapter_model.safetensors"
    save_file({k: v.half().float() for k, v in load_file(weights).items()}, weights)
    res = run_cli("convert-adapter", str(peft_dir), "--output", str(root / "npy"), "--tp", "2")
    assert res.returncode == 0, res.stderr
    return peft_dir, np.load(root / "npy" / "model.lora_weights.npy"), np.load(root / "npy" / "model.lora_config.npy")


@pytest.fixture(scope="module")
def reference(served, converted, tokenizer):
    """`generate --tp 2` token ids for each prompt, without adapter and with the converted one (as task 5)."""
    _, model, _ = served
    reqs = [{"id": f"{a}-{i}", "adapter": a, "prompt_ids": tokenizer.encode(p), "max_tokens": 10}
            for a in (None, 5) for i, p in enumerate(PROMPTS)]
    res = run_cli("generate", "--model", str(model), "--tp", "2", "--adapter", f"5={converted[0]}", "--requests", "-",
                  stdin="\n".join(json.dumps(r) for r in reqs) + "\n")
    assert res.returncode == 0, res.stderr[-2000:]
    return {out["id"]: out["output_ids"] for out in map(json.loads, res.stdout.splitlines())}


def _without_end(ids, end_id):
    return ids[:-1] if ids and ids[-1] == end_id else ids


def test_core_model_equals_generate_with_and_without_adapter(grpc_client, tokenizer, reference, converted):
    _, weights, config = converted
    end, pad = tokenizer.eos_token_id, tokenizer.eos_token_id
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt)
        plain = grpc_client.infer("tensorrt_llm", tensors(core_inputs(ids, 10, end, pad)))
        assert plain.as_numpy("output_ids")[0, 0].tolist() == ids + _without_end(reference[f"None-{i}"], end)
        assert plain.as_numpy("sequence_length")[0, 0] == plain.as_numpy("output_ids").shape[2]
        lora = core_inputs(ids, 10, end, pad, lora_task_id=np.array([[5]], np.uint64))
        if i == 0:  # first use registers the adapter, as TensorRT-LLM's cache does
            lora.update(lora_weights=weights, lora_config=config)
        out = grpc_client.infer("tensorrt_llm", tensors(lora))
        assert out.as_numpy("output_ids")[0, 0].tolist() == ids + _without_end(reference[f"5-{i}"], end)
    assert reference["5-0"] != reference["None-0"]  # the adapter changes the tokens


def test_chain_equals_ensemble_over_grpc_and_http(grpc_client, http_client, tokenizer):
    """end_to_end_test.py's preprocessing -> tensorrt_llm -> postprocessing calls, batch of 2, against the ensemble."""
    for protocol, client in (("grpc", grpc_client), ("http", http_client)):
        query = np.array([[PROMPTS[0]], [PROMPTS[1]]], dtype=object)
        pre = client.infer("preprocessing", tensors({
            "QUERY": query, "REQUEST_OUTPUT_LEN": np.array([[8], [8]], np.int32),
            "BAD_WORDS_DICT": np.array([[""], [""]], dtype=object), "STOP_WORDS_DICT": np.array([[""], [""]], dtype=object)},
            protocol))
        ids, lengths = pre.as_numpy("INPUT_ID"), pre.as_numpy("REQUEST_INPUT_LEN")
        assert lengths[:, 0].tolist() == [len(tokenizer.encode(p)) for p in PROMPTS[:2]]
        assert pre.as_numpy("OUT_END_ID")[:, 0].tolist() == [tokenizer.eos_token_id] * 2
        texts = []
        for b in range(2):
            core = client.infer("tensorrt_llm", tensors({
                "input_ids": ids[b : b + 1], "input_lengths": lengths[b : b + 1],
                "request_output_len": pre.as_numpy("REQUEST_OUTPUT_LEN")[b : b + 1],
                "end_id": pre.as_numpy("OUT_END_ID")[b : b + 1], "pad_id": pre.as_numpy("OUT_PAD_ID")[b : b + 1],
                "bad_words_list": pre.as_numpy("BAD_WORDS_IDS")[b : b + 1],
                "stop_words_list": pre.as_numpy("STOP_WORDS_IDS")[b : b + 1]}, protocol))
            post = client.infer("postprocessing", tensors({"TOKENS_BATCH": core.as_numpy("output_ids"),
                                                          "SEQUENCE_LENGTH": core.as_numpy("sequence_length")}, protocol))
            texts.append(post.as_numpy("OUTPUT")[0].decode())
        ensemble = client.infer("ensemble", tensors({"text_input": query, "max_tokens": np.array([[8], [8]], np.int32),
                                                     "bad_words": np.array([[""], [""]], dtype=object),
                                                     "stop_words": np.array([[""], [""]], dtype=object)}, protocol))
        assert [t.decode() for t in ensemble.as_numpy("text_output")] == texts
        assert texts[0].startswith(PROMPTS[0]) and len(texts[0]) > len(PROMPTS[0])  # prompt included by default
        bls = client.infer("tensorrt_llm_bls", tensors({"text_input": query[:1], "max_tokens": np.array([[8]], np.int32)},
                                                       protocol))
        assert bls.as_numpy("text_output")[0].decode() == texts[0]


def test_streaming_equals_non_streaming_and_exclude_input(grpc_client, tokenizer):
    full = grpc_client.infer("ensemble", tensors(ensemble_inputs(PROMPTS[2], 9))).as_numpy("text_output")[0].decode()
    generated = grpc_client.infer("ensemble", tensors(ensemble_inputs(
        PROMPTS[2], 9, exclude_input_in_output=np.array([[True]], bool)))).as_numpy("text_output")[0].decode()
    assert full == PROMPTS[2] + generated and generated
    responses = stream(grpc_client, "ensemble", ensemble_inputs(PROMPTS[2], 9, stream=np.array([[True]], bool)))
    assert len(responses) == 9 and all("batch_index" not in r for r in responses)
    assert "".join(r["text_output"][0].decode() for r in responses) == generated
    # the core model streams one token per response, the prompt never
    ids = tokenizer.encode(PROMPTS[2])
    end = tokenizer.eos_token_id
    core = stream(grpc_client, "tensorrt_llm", core_inputs(ids, 9, end, end, streaming=True))
    assert all(r["output_ids"].shape == (1, 1, 1) and r["sequence_length"][0, 0] == 1 for r in core)
    whole = grpc_client.infer("tensorrt_llm", tensors(core_inputs(ids, 9, end, end))).as_numpy("output_ids")[0, 0]
    assert [int(r["output_ids"][0, 0, 0]) for r in core] == whole.tolist()[len(ids):]
    excluded = grpc_client.infer("tensorrt_llm", tensors(core_inputs(
        ids, 9, end, end, exclude_input_in_output=np.array([[True]], bool)))).as_numpy("output_ids")[0, 0]
    assert excluded.tolist() == whole.tolist()[len(ids):]


def test_batched_streaming_carries_batch_index(grpc_client):
    values = ensemble_inputs(PROMPTS[0], 5, stream=np.array([[True]], bool))
    values = {k: np.concatenate([v, v]) for k, v in values.items()}
    values["text_input"] = np.array([[PROMPTS[0]], [PROMPTS[1]]], dtype=object)
    responses = stream(grpc_client, "ensemble", values)
    by_row = {0: "", 1: ""}
    for r in responses:
        by_row[int(r["batch_index"][0, 0])] += r["text_output"][0].decode()
    for row, prompt in enumerate(PROMPTS[:2]):
        alone = grpc_client.infer("ensemble", tensors(ensemble_inputs(prompt, 5)))
        assert prompt + by_row[row] == alone.as_numpy("text_output")[0].decode()


def test_stop_words_end_the_sequence_and_bad_words_ban(grpc_client, http_client, tokenizer):
    generated_ids = grpc_client.infer("tensorrt_llm", tensors(core_inputs(
        tokenizer.encode(PROMPTS[1]), 8, 2, 2, exclude_input_in_output=np.array([[True]], bool)))
    ).as_numpy("output_ids")[0, 0].tolist()
    def usable(i):  # a token whose text is one token, seen first at i, and not inside the text before it
        word = tokenizer.decode(generated_ids[i])
        return (tokenizer.encode(word, add_special_tokens=False) == [generated_ids[i]] and word.strip()
                and generated_ids[i] not in generated_ids[:i] and word not in tokenizer.decode(generated_ids[:i]))

    k = next(i for i in range(2, len(generated_ids)) if usable(i))
    word = tokenizer.decode(generated_ids[k])
    base = dict(exclude_input_in_output=np.array([[True]], bool))
    stopped = grpc_client.infer("ensemble", tensors(ensemble_inputs(
        PROMPTS[1], 8, stop_words=np.array([[word]], dtype=object), **base))).as_numpy("text_output")[0].decode()
    assert stopped == tokenizer.decode(generated_ids[: k + 1])
    banned = http_client.infer("ensemble", tensors(ensemble_inputs(
        PROMPTS[1], 8, bad_words=np.array([[word]], dtype=object), **base), "http")).as_numpy("text_output")[0].decode()
    assert banned.startswith(tokenizer.decode(generated_ids[:k])) and banned != tokenizer.decode(generated_ids)
    # the BLS model cuts the text after the stop word too
    bls = grpc_client.infer("tensorrt_llm_bls", tensors(ensemble_inputs(
        PROMPTS[1], 8, stop_words=np.array([[word]], dtype=object), **base))).as_numpy("text_output")[0].decode()
    assert bls == stopped


def _penalised_greedy(hf_model, ids, n, rep, presence, frequency, temperature):
    """TensorRT-LLM's penalties (penaltyKernels.cu) in float64 on transformers' logits: an independent reference."""
    seq = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = hf_model(torch.tensor([seq])).logits[0, -1].double()
        logits = logits / (temperature + 1e-6)
        out = logits.clone()
        for token in set(seq):
            value = out[token]
            value = value * rep if value < 0 else value / rep
            out[token] = value - presence - frequency * seq.count(token)
        seq.append(int(out.argmax()))
    return seq[len(ids):]


def test_penalties_min_tokens_and_logits_follow_tensorrt_llm(grpc_client, tokenizer, hf_model):
    ids = tokenizer.encode(PROMPTS[0])
    end = tokenizer.eos_token_id
    # a negative presence penalty rewards seen tokens (the random model never repeats on its own); frequency and
    # repetition penalties then decide among them
    penalties = dict(repetition_penalty=np.array([[1.5]], np.float32), presence_penalty=np.array([[-40.0]], np.float32),
                     frequency_penalty=np.array([[2.5]], np.float32), temperature=np.array([[0.8]], np.float32),
                     exclude_input_in_output=np.array([[True]], bool))
    out = grpc_client.infer("tensorrt_llm", tensors(core_inputs(ids, 8, end, end, **penalties)))
    expected = _penalised_greedy(hf_model, ids, 8, 1.5, -40.0, 2.5, float(np.float32(0.8)))
    assert out.as_numpy("output_ids")[0, 0].tolist() == expected
    plain = grpc_client.infer("tensorrt_llm", tensors(core_inputs(
        ids, 8, end, end, exclude_input_in_output=np.array([[True]], bool)))).as_numpy("output_ids")[0, 0].tolist()
    assert plain != expected  # the penalties changed something
    # end_id = the first greedy token: the sequence ends at once unless min_tokens holds it off
    first = plain[0]
    ended = grpc_client.infer("tensorrt_llm", tensors(core_inputs(ids, 8, first, end, exclude_input_in_output=np.array(
        [[True]], bool))))
    assert ended.as_numpy("sequence_length")[0, 0] == 0
    held = grpc_client.infer("tensorrt_llm", tensors(core_inputs(ids, 8, first, end, min_tokens=np.array(
        [[3]], np.int32), exclude_input_in_output=np.array([[True]], bool)))).as_numpy("output_ids")[0, 0].tolist()
    assert len(held) >= 3 and first not in held[:3]
    # logits and log probs against transformers
    out = grpc_client.infer("tensorrt_llm", tensors(core_inputs(
        ids, 4, end, end, return_context_logits=np.array([[True]], bool),
        return_generation_logits=np.array([[True]], bool), return_log_probs=np.array([[True]], bool),
        exclude_input_in_output=np.array([[True]], bool))))
    generated = out.as_numpy("output_ids")[0, 0].tolist()
    with torch.no_grad():
        hf = hf_model(torch.tensor([ids + generated])).logits[0].numpy()
    np.testing.assert_allclose(out.as_numpy("context_logits")[0], hf[: len(ids)], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(out.as_numpy("generation_logits")[0, 0], hf[len(ids) - 1 : -1], atol=2e-3, rtol=1e-3)
    assert out.as_numpy("output_log_probs").shape == (1, 1, 4)
    np.testing.assert_array_equal(out.as_numpy("output_log_probs"), 0.0)  # greedy, normalised: log P(top-1) = 0


def test_sampling_log_probs_and_return_sequences(grpc_client, tokenizer):
    ids = tokenizer.encode(PROMPTS[1])
    end = tokenizer.eos_token_id
    sampling = dict(runtime_top_k=np.array([[0]], np.int32), runtime_top_p=np.array([[0.9]], np.float32),
                    seed=np.array([[11]], np.uint64), return_log_probs=np.array([[True]], bool),
                    exclude_input_in_output=np.array([[True]], bool))
    a = grpc_client.infer("tensorrt_llm", tensors(core_inputs(ids, 8, end, end, return_num_input_tokens=np.array(
        [[True]], bool), return_num_output_tokens=np.array([[True]], bool), **sampling)))
    assert a.as_numpy("num_input_tokens")[0, 0] == len(ids) and a.as_numpy("num_output_tokens")[0, 0] == 8
    b = grpc_client.infer("tensorrt_llm", tensors(core_inputs(ids, 8, end, end, **sampling)))
    assert a.as_numpy("output_ids").tolist() == b.as_numpy("output_ids").tolist()  # seeded
    logps = a.as_numpy("output_log_probs")[0, 0]
    assert (logps <= 0).all() and (logps < 0).any()
    assert math.isclose(float(a.as_numpy("cum_log_probs")[0, 0]), float(logps.sum()), rel_tol=1e-5)
    n = stream(grpc_client, "tensorrt_llm", core_inputs(ids, 8, end, end, num_return_sequences=np.array([[2]], np.int32),
                                                       **sampling))
    by_seq = {}
    for r in n:
        by_seq.setdefault(int(r["sequence_index"][0, 0]), []).extend(r["output_ids"][0, 0].tolist())
    assert sorted(by_seq) == [0, 1] and by_seq[0] != by_seq[1]
    assert by_seq[0] == a.as_numpy("output_ids")[0, 0].tolist()  # sequence 0 uses the request's seed


REJECTED = {
    "beam_width": ("tensorrt_llm", {"beam_width": np.array([[2]], np.int32)}),
    "draft_input_ids": ("tensorrt_llm", {"draft_input_ids": np.array([[5, 6]], np.int32)}),
    "guided_decoding_guide_type": ("tensorrt_llm", {"guided_decoding_guide_type": np.array([["structural_tag"]], dtype=object)}),
    "guided_decoding_guide": ("tensorrt_llm", {"guided_decoding_guide_type": np.array([["json_schema"]], dtype=object),
                                               "guided_decoding_guide": np.array([['{"type": "object", ']], dtype=object)}),
    "runtime_top_p_decay": ("tensorrt_llm", {"runtime_top_p_decay": np.array([[0.5]], np.float32)}),
    "temperature": ("tensorrt_llm", {"temperature": np.array([[float("nan")]], np.float32)}),
    "runtime_top_p": ("tensorrt_llm", {"runtime_top_p": np.array([[1.5]], np.float32)}),
    "repetition_penalty": ("tensorrt_llm", {"repetition_penalty": np.array([[0.0]], np.float32)}),
    "presence_penalty": ("tensorrt_llm", {"presence_penalty": np.array([[float("inf")]], np.float32)}),
    "min_tokens": ("tensorrt_llm", {"min_tokens": np.array([[-1]], np.int32)}),
    "top_p": ("ensemble", {"top_p": np.array([[float("nan")]], np.float32)}),
    "num_draft_tokens": ("tensorrt_llm_bls", {"num_draft_tokens": np.array([[3]], np.int32)}),
    "IMAGE_URL": ("preprocessing", {"IMAGE_URL": np.array([["http://x/y.png"]], dtype=object)}),
    "random_seed": ("ensemble", {"random_seed": np.array([[1]], np.uint64)}),  # removed after backend v0.19
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_inputs_that_cannot_be_honoured_are_named(name, grpc_client, http_client, tokenizer):
    model, extra = REJECTED[name]
    ids = tokenizer.encode(PROMPTS[0])
    if model == "tensorrt_llm":
        values = core_inputs(ids, 4, 2, 2, **extra)
    elif model == "preprocessing":
        values = {"QUERY": np.array([[PROMPTS[0]]], dtype=object), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32), **extra}
    else:
        values = ensemble_inputs(PROMPTS[0], 4, **extra)
    for protocol, client in (("grpc", grpc_client), ("http", http_client)):
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, tensors(values, protocol))
        message = str(info.value)
        assert name in message and "\n" not in message, message
    assert grpc_client.infer("ensemble", tensors(ensemble_inputs(PROMPTS[0], 2))).as_numpy("text_output") is not None


def test_neutral_optional_inputs_are_accepted(grpc_client, tokenizer):
    ids = tokenizer.encode(PROMPTS[2])
    base = grpc_client.infer("tensorrt_llm", tensors(core_inputs(ids, 6, 2, 2))).as_numpy("output_ids").tolist()
    neutral = core_inputs(ids, 6, 2, 2, num_return_sequences=np.array([[1]], np.int32),
                          len_penalty=np.array([[1.0]], np.float32), early_stopping=np.array([[True]], bool),
                          beam_search_diversity_rate=np.array([[0.0]], np.float32),
                          runtime_top_p_decay=np.array([[1.0]], np.float32),
                          repetition_penalty=np.array([[1.0]], np.float32), min_tokens=np.array([[0]], np.int32),
                          return_log_probs=np.array([[False]], bool), return_perf_metrics=np.array([[False]], bool),
                          embedding_bias=np.zeros((1, 0), np.float32),
                          stop_words_list=np.zeros((1, 2, 0), np.int32), bad_words_list=np.zeros((1, 2, 0), np.int32),
                          guided_decoding_guide_type=np.array([[""]], dtype=object),
                          draft_input_ids=np.zeros((1, 0), np.int32), seed=np.array([[0]], np.uint64))
    assert grpc_client.infer("tensorrt_llm", tensors(neutral)).as_numpy("output_ids").tolist() == base


def test_http_generate_extension(served, grpc_client):
    url = f"http://{served[0].http_url}/v2/models/ensemble"
    body = {"text_input": PROMPTS[0], "max_tokens": 6, "bad_words": "", "stop_words": ""}
    one = requests.post(f"{url}/generate", json=body, timeout=120).json()
    unary = grpc_client.infer("ensemble", tensors(ensemble_inputs(PROMPTS[0], 6))).as_numpy("text_output")[0].decode()
    assert one["text_output"] == unary and one["model_name"] == "ensemble"
    events = requests.post(f"{url}/generate_stream", json={**body, "stream": True, "exclude_input_in_output": True},
                           timeout=120).text
    parts = [json.loads(line[len("data: "):]) for line in events.splitlines() if line.startswith("data: ")]
    assert len(parts) == 6 and PROMPTS[0] + "".join(p["text_output"] for p in parts) == unary
    bad = requests.post(f"{url}/generate", json={**body, "beam_width": 3}, timeout=60)
    assert bad.status_code == 400 and "beam_width" in bad.json()["error"]


def _metrics(served) -> dict[str, float]:
    out = {}
    for line in requests.get(served[0].metrics_url, timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_count_requests(served, grpc_client, http_client):
    before = _metrics(served)
    for client, protocol in ((grpc_client, "grpc"), (grpc_client, "grpc"), (http_client, "http")):
        client.infer("ensemble", tensors(ensemble_inputs(PROMPTS[0], 3), protocol))
    with pytest.raises(InferenceServerException):
        grpc_client.infer("ensemble", tensors(ensemble_inputs(PROMPTS[0], 3, beam_width=np.array([[4]], np.int32))))
    after = _metrics(served)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    # an ensemble request counts for each composing model too; the rejected one got through preprocessing
    for model, success in (("ensemble", 3), ("preprocessing", 4), ("tensorrt_llm", 3), ("postprocessing", 3)):
        assert delta(f'nv_inference_request_success{{model="{model}",version="1"}}') == success, model
    for model in ("ensemble", "tensorrt_llm"):
        assert delta(f'nv_inference_request_failure{{model="{model}",reason="BACKEND",version="1"}}') == 1, model
    assert delta('nv_inference_count{model="ensemble",version="1"}') == 3
    assert delta('nv_inference_request_duration_us{model="ensemble",version="1"}') > 0
    output_tokens = 'nv_llm_output_token_len_sum{model="tensorrt_llm",response_metric_type="total_output_tokens",version="1"}'
    assert delta(output_tokens) == 9
    assert after["trtllm_bdlora_adapters_registered"] >= 3
    assert after["trtllm_bdlora_lora_collectives_per_step"] == 0  # bdlora: no LoRA communication
    assert after['nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"}'] == 16
    assert delta('nv_trt_llm_general_metrics{general_type="iteration_counter",model="tensorrt_llm",version="1"}') >= 9

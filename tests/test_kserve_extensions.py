"""The KServe extensions `serve` advertises, driven with tritonclient over gRPC and HTTP against one `serve --tp 2`
(as tests/conftest.py triton_served, with decoupled_mode=false): repository load / unload, logging, trace settings
and system shared memory answer as tritonserver answers them (facts recorded from tritonserver 2.51, the pytriton
wheel, and Triton's sources: http_server.cc, model_repository_manager.cc, shared_memory_manager.cc, tracer.cc);
unknown routes in Triton's error shape. The metrics count every request whatever its protocol, and `promtool check
metrics` finds nothing but the documented Triton names (docs/metrics.md)."""

import json
import os
import re
import shutil
import subprocess
import time
import uuid

import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tests.helpers import make_peft_adapter
from tests.serving_helpers import Server
from tests.test_triton_serve import core_inputs, ensemble_inputs, tensors

MODELS = ("ensemble", "postprocessing", "preprocessing", "tensorrt_llm", "tensorrt_llm_bls")
EXTENSIONS = ["model_repository", "model_repository(unload_dependents)", "model_configuration", "system_shared_memory",
              "binary_tensor_data", "parameters", "statistics", "trace", "logging", "generate"]
# tritonserver 2.51's default trace settings (`--trace-config` not given)
TRACE_DEFAULTS = {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1", "log_frequency": "0",
                  "trace_file": "", "trace_mode": "triton"}
LOG_DEFAULTS = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 0,
                "log_format": "default", "log_access": True}
# promtool's complaints about the names Triton itself exports (docs/metrics.md): the only ones allowed
TRITON_NAME_COMPLAINTS = {
    f"nv_inference_{name} counter metrics should have \"_total\" suffix" for name in (
        "compute_infer_duration_us", "compute_input_duration_us", "compute_output_duration_us", "count",
        "exec_count", "queue_duration_us", "request_duration_us", "request_failure", "request_success")} | {
    f"nv_inference_{name} metric names should not contain abbreviated units" for name in (
        "compute_infer_duration_us", "compute_input_duration_us", "compute_output_duration_us",
        "first_response_histogram_ms", "queue_duration_us", "request_duration_us")} | {
    f"nv_inference_{name} non-histogram and non-summary metrics should not have \"_count\" suffix" for name in (
        "count", "exec_count", "pending_request_count")} | {
    "nv_inference_first_response_histogram_ms metric name should not include type 'histogram'"}


@pytest.fixture(scope="module")
def served_model(tiny_llama_with_tokenizer, tmp_path_factory):
    """conftest's triton_served (adapters 1-3, 2 slots per rank) answering as a repository written with
    decoupled_mode=false: unary ModelInfer to the ensemble and tensorrt_llm, which Triton refuses while they are
    decoupled."""
    root = tmp_path_factory.mktemp("extensions")
    model = tiny_llama_with_tokenizer
    adapters = {i + 1: make_peft_adapter(model, root / f"a{i + 1}", seed=30 + i, r=16) for i in range(3)}
    server = Server(model, adapters, tp=2, max_loras=2, extra=["--set", "decoupled_mode=false"])
    try:
        server.wait_ready()
        yield server, model
    finally:
        assert server.stop() == 0, server.output()[-3000:]


@pytest.fixture(scope="module")
def served(served_model):
    return served_model[0]


@pytest.fixture(scope="module")
def grpc_client(served):
    c = grpcclient.InferenceServerClient(served.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http_client(served):
    c = httpclient.InferenceServerClient(served.http_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tokenizer(served_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_model[1])


def _http(served, method, path, body=None):
    response = requests.request(method, f"http://{served.http_url}{path}", timeout=60,
                                data=None if body is None else json.dumps(body))
    return response.status_code, (response.json() if response.content else None)


def _grpc_error(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status().removeprefix("StatusCode."), info.value.message()


def _log_since(served, mark: int) -> str:
    time.sleep(0.3)  # the access line is written as the request ends, before its answer; give stderr a moment
    return served.output()[mark:]


# ---------------------------------------------------------------------------- metadata and routes
def test_server_metadata_advertises_exactly_the_served_extensions(grpc_client, http_client):
    assert list(grpc_client.get_server_metadata().extensions) == EXTENSIONS
    assert http_client.get_server_metadata()["extensions"] == EXTENSIONS


def test_unknown_routes_and_methods_answer_in_triton_error_shape(served):
    base = f"http://{served.http_url}"
    for method, path, status, text in (("GET", "/v2/nosuch", 404, "Not Found"), ("GET", "/nosuch", 404, "Not Found"),
                                       ("POST", "/v2/cudasharedmemory/status", 404, "Not Found"),
                                       ("GET", "/v2/models/ensemble/infer", 405, "Method Not Allowed"),
                                       ("POST", "/v2/health/live", 405, "Method Not Allowed"),
                                       ("PUT", "/v2/logging", 405, "Method Not Allowed")):
        response = requests.request(method, base + path, timeout=30)
        assert (response.status_code, response.json()) == (status, {"error": text}), (method, path)
    response = requests.get(served.metrics_url.replace("/metrics", "/nosuch"), timeout=30)
    assert (response.status_code, response.json()) == (404, {"error": "Not Found"})


# ---------------------------------------------------------------------------- repository load / unload
def _index(client) -> dict[str, tuple[str, str]]:
    models = client.get_model_repository_index(as_json=True)["models"] if isinstance(
        client, grpcclient.InferenceServerClient) else client.get_model_repository_index()
    return {m["name"]: (m["state"], m.get("reason", "")) for m in models}


def test_repository_load_and_unload_answer_as_triton(served, grpc_client, http_client):
    prompt = ensemble_inputs("Hello there", 3)
    before = grpc_client.infer("ensemble", tensors(prompt)).as_numpy("text_output")
    try:
        http_client.load_model("ensemble")  # already loaded: success, nothing changes
        assert _index(http_client) == {m: ("READY", "") for m in MODELS}
        grpc_client.unload_model("tensorrt_llm")  # the ensemble that composes it goes with it
        unloaded = {"tensorrt_llm": ("UNAVAILABLE", "unloaded"), "ensemble": ("UNAVAILABLE", "unloaded")}
        assert _index(http_client) == {m: unloaded.get(m, ("READY", "")) for m in MODELS}
        assert _index(grpc_client) == _index(http_client)
        gone = "Request for unknown model: 'ensemble' has no available versions"
        assert _grpc_error(lambda: grpc_client.infer("ensemble", tensors(prompt))) == ("NOT_FOUND", gone)
        assert _http(served, "GET", "/v2/models/ensemble") == (404, {"error": gone})
        assert _http(served, "GET", "/v2/models/tensorrt_llm/stats") == (
            400, {"error": "requested model 'tensorrt_llm' is not available"})
        assert not grpc_client.is_model_ready("tensorrt_llm") and not http_client.is_model_ready("ensemble")
        assert grpc_client.is_server_ready()  # Triton's server stays ready: unloaded models are not live
        _, message = _grpc_error(lambda: grpc_client.infer("tensorrt_llm_bls", tensors(
            {"text_input": prompt["text_input"], "max_tokens": prompt["max_tokens"]})))
        assert "'tensorrt_llm' has no available versions" in message
        assert grpc_client.infer("preprocessing", tensors({  # the others keep serving
            "QUERY": prompt["text_input"], "REQUEST_OUTPUT_LEN": prompt["max_tokens"]})).as_numpy("INPUT_ID").size
        http_client.load_model("tensorrt_llm")  # and the ensemble is back
        assert _index(http_client) == {m: ("READY", "") for m in MODELS}
        assert (grpc_client.infer("ensemble", tensors(prompt)).as_numpy("text_output") == before).all()

        http_client.unload_model("ensemble", unload_dependents=True)  # its composing models too
        unloaded = {m: ("UNAVAILABLE", "unloaded") for m in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")}
        assert _index(grpc_client) == {m: unloaded.get(m, ("READY", "")) for m in MODELS}
        grpc_client.load_model("ensemble")  # loads its composing models
        assert _index(http_client) == {m: ("READY", "") for m in MODELS}

        grpc_client.unload_model("nosuch")  # unknown: success, as Triton
        assert _http(served, "POST", "/v2/repository/models/nosuch/unload") == (200, None)
        poll = "failed to load 'nosuch', failed to poll from model repository"
        assert _grpc_error(lambda: grpc_client.load_model("nosuch")) == ("INTERNAL", poll)
        assert _http(served, "POST", "/v2/repository/models/nosuch/load") == (500, {"error": poll})
        status, body = _http(served, "POST", "/v2/repository/models/ensemble/load",
                             {"parameters": {"config": json.dumps({"max_batch_size": 4})}})
        assert status == 501 and "'config' is not supported" in body["error"]
        assert _grpc_error(lambda: grpc_client.load_model("ensemble", config="{}"))[0] == "UNIMPLEMENTED"
        assert _http(served, "GET", "/v2/repository/models/ensemble/load") == (405, {"error": "Method Not Allowed"})
    finally:
        for model in MODELS:
            http_client.load_model(model)
    assert _index(http_client) == {m: ("READY", "") for m in MODELS}


# ---------------------------------------------------------------------------- logging
def _raw_log_update(served, settings: dict) -> tuple[str, str]:
    """LogSettings with each value in the field its Python type names (tritonclient picks the field by the key)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    request = pb.LogSettingsRequest()
    for key, value in settings.items():
        field = "bool_param" if isinstance(value, bool) else "string_param" if isinstance(value, str) else "uint32_param"
        setattr(request.settings[key], field, value)
    with grpc.insecure_channel(served.url) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).LogSettings(request, timeout=30)
        except grpc.RpcError as err:
            return err.code().name, err.details()
    return "OK", ""


def test_logging_settings_change_what_serve_logs_at_run_time(served, grpc_client, http_client):
    assert http_client.get_log_settings() == LOG_DEFAULTS
    values = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in grpc_client.get_log_settings().settings.items()}
    assert values == LOG_DEFAULTS

    def access_line_logged() -> bool:
        mark, request_id = len(served.output()), f"kx-log-{uuid.uuid4().hex[:8]}"
        grpc_client.infer("tensorrt_llm_bls", tensors({"text_input": np.array([["Hi"]], dtype=object),
                                                       "max_tokens": np.array([[2]], np.int32)}), request_id=request_id)
        return f"id={request_id}" in _log_since(served, mark)

    try:
        assert access_line_logged()
        assert http_client.update_log_settings({"log_access": False}) == {**LOG_DEFAULTS, "log_access": False}
        assert not access_line_logged()
        grpc_client.update_log_settings({"log_access": True, "log_info": False})
        assert http_client.get_log_settings() == {**LOG_DEFAULTS, "log_info": False}
        assert not access_line_logged()  # INFO is off
        http_client.update_log_settings({"log_info": True})
        assert access_line_logged()
        for bad, status, code, fragment in (({"log_info": "no"}, 400, "INVALID_ARGUMENT", "expect boolean for 'log_info'"),
                                            ({"log_verbose_level": -1}, 400, "INVALID_ARGUMENT", "unsigned integer"),
                                            ({"log_file": "/tmp/x"}, 501, "UNIMPLEMENTED",
                                             "log file location can not be updated through network protocol"),
                                            ({"log_format": "json"}, 400, "INVALID_ARGUMENT", "log_format"),
                                            ({"log_nonsense": True}, 400, "INVALID_ARGUMENT", "log_nonsense")):
            got_status, body = _http(served, "POST", "/v2/logging", bad)
            assert got_status == status and fragment in body["error"], bad
            if bad != {"log_verbose_level": -1}:  # gRPC's uint32_param cannot carry it
                got_code, message = _raw_log_update(served, bad)
                assert got_code == code and fragment in message, bad
        assert http_client.get_log_settings() == LOG_DEFAULTS  # a refused update changes nothing
    finally:
        http_client.update_log_settings({k: v for k, v in LOG_DEFAULTS.items() if k not in ("log_file", "log_format")})


# ---------------------------------------------------------------------------- trace settings
def test_trace_settings_kept_answered_and_traced_as_triton(served, grpc_client, http_client):
    assert http_client.get_trace_settings() == TRACE_DEFAULTS
    assert http_client.get_trace_settings("ensemble") == TRACE_DEFAULTS
    as_json = grpc_client.get_trace_settings(as_json=True)["settings"]
    assert {k: v["value"] for k, v in as_json.items()} == {k: v if isinstance(v, list) else [v]
                                                         for k, v in TRACE_DEFAULTS.items()}
    try:
        # a model's override, counted down as its requests are traced; the global setting unchanged
        assert http_client.update_trace_settings("tensorrt_llm_bls", {"trace_level": ["TIMESTAMPS"], "trace_rate": "1",
                                                                      "trace_count": "2"}) == {
            **TRACE_DEFAULTS, "trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "2"}
        assert http_client.get_trace_settings() == TRACE_DEFAULTS
        mark = len(served.output())
        for i in range(3):
            grpc_client.infer("tensorrt_llm_bls", tensors({"text_input": np.array([["Hi"]], dtype=object),
                                                           "max_tokens": np.array([[2]], np.int32)}),
                              request_id=f"kx-trace-{i}")
        traces = [json.loads(line.split("trtllm_bdlora.trace ", 1)[1]) for line in _log_since(served, mark).splitlines()
                  if " trtllm_bdlora.trace " in line]
        assert [(t["model_name"], t["request_id"]) for t in traces] == [("tensorrt_llm_bls", "kx-trace-0"),
                                                                       ("tensorrt_llm_bls", "kx-trace-1")]
        for t in traces:
            names = [s["name"] for s in t["timestamps"]]
            stamps = [s["ns"] for s in t["timestamps"]]
            assert names == ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_END", "REQUEST_END"]
            assert stamps == sorted(stamps) and stamps[-1] > stamps[0]
        assert http_client.get_trace_settings("tensorrt_llm_bls")["trace_count"] == "0"
        # null clears an override back to the global value; over gRPC an empty value does
        assert http_client.update_trace_settings("tensorrt_llm_bls", {"trace_count": None})["trace_count"] == "-1"
        settings = grpc_client.update_trace_settings("tensorrt_llm_bls", {"trace_level": None}, as_json=True)["settings"]
        assert settings["trace_level"]["value"] == ["OFF"] and settings["trace_rate"]["value"] == ["1"]
        for bad, status, code, fragment in (
                ({"trace_rate": "abc"}, 400, "INVALID_ARGUMENT", "Unable to parse 'trace_rate', got: abc"),
                ({"trace_count": "-2"}, 400, "INVALID_ARGUMENT", "Expecting value >= -1, got:-2"),
                ({"trace_level": ["OFF", "TIMESTAMPS"]}, 400, "INVALID_ARGUMENT", "only one trace level 'OFF'"),
                ({"trace_file": "/tmp/t.json"}, 501, "UNIMPLEMENTED", "trace file location can not be updated"),
                ({"trace_level": ["TENSORS"]}, 501, "UNIMPLEMENTED", "TENSORS")):
            got_status, body = _http(served, "POST", "/v2/trace/setting", bad)
            assert got_status == status and fragment in body["error"], bad
            got_code, message = _grpc_error(lambda bad=bad: grpc_client.update_trace_settings(settings=bad))
            assert got_code == code and fragment in message, bad
        assert _http(served, "GET", "/v2/models/nosuch/trace/setting") == (400, {"error": "Request for unknown model : nosuch"})
        assert _grpc_error(lambda: grpc_client.get_trace_settings("nosuch")) == ("INVALID_ARGUMENT",
                                                                               "Request for unknown model : nosuch")
        assert http_client.get_trace_settings() == TRACE_DEFAULTS
    finally:
        http_client.update_trace_settings("tensorrt_llm_bls", {k: None for k in ("trace_level", "trace_rate", "trace_count")})


# ---------------------------------------------------------------------------- system shared memory
def _core_request(tokenizer, prompt: str, max_tokens: int):
    end = tokenizer.eos_token_id
    return core_inputs(tokenizer.encode(prompt), max_tokens, end, end)


def test_system_shared_memory_over_grpc_and_http_equals_plain_requests(served, grpc_client, http_client, tokenizer):
    """tritonclient's own shared_memory module: regions created and registered, inputs read from them and outputs
    written to them, over both protocols; results equal the same requests without shared memory."""
    tag = uuid.uuid4().hex[:8]
    regions = {name: shm.create_shared_memory_region(f"kx_{name}_{tag}", f"/kx_{name}_{tag}", 4096)
               for name in ("in", "out")}
    try:
        # gRPC: the ensemble's BYTES text in and out of shared memory, the other inputs in the request
        values = ensemble_inputs("The capital of France is", 6)
        plain = grpc_client.infer("ensemble", tensors(values)).as_numpy("text_output")
        serialized = serialize_byte_tensor(values.pop("text_input"))  # as Triton's own shm examples write BYTES
        shm.set_shared_memory_region(regions["in"], [serialized])
        text_size = len(serialized.item())
        grpc_client.register_system_shared_memory(f"kx_in_{tag}", f"/kx_in_{tag}", 4096)
        grpc_client.register_system_shared_memory(f"kx_out_{tag}", f"/kx_out_{tag}", 2048, offset=1024)
        status = grpc_client.get_system_shared_memory_status(as_json=True)["regions"]
        assert status[f"kx_out_{tag}"] == {"name": f"kx_out_{tag}", "key": f"/kx_out_{tag}", "offset": "1024",
                                          "byte_size": "2048"}
        text_input = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text_input.set_shared_memory(f"kx_in_{tag}", text_size)
        text_output = grpcclient.InferRequestedOutput("text_output")
        text_output.set_shared_memory(f"kx_out_{tag}", 1024, offset=16)
        result = grpc_client.infer("ensemble", [text_input, *tensors(values)], outputs=[text_output])
        shape = list(result.get_output("text_output").shape)
        got = shm.get_contents_as_numpy(regions["out"], np.object_, shape, offset=1024 + 16)
        assert shape == list(plain.shape) and got.tolist() == plain.tolist()

        # HTTP: the core model's token ids in, output_ids and sequence_length out, at offsets of one region
        core = _core_request(tokenizer, "Once upon a time", 7)
        plain = http_client.infer("tensorrt_llm", tensors(core, "http"))
        ids = core.pop("input_ids")
        shm.set_shared_memory_region(regions["in"], [ids], offset=64)
        http_client.register_system_shared_memory(f"kx_in2_{tag}", f"/kx_in_{tag}", 1024)
        assert http_client.get_system_shared_memory_status(f"kx_in2_{tag}") == [
            {"name": f"kx_in2_{tag}", "key": f"/kx_in_{tag}", "offset": 0, "byte_size": 1024}]
        ids_input = httpclient.InferInput("input_ids", list(ids.shape), "INT32")
        ids_input.set_shared_memory(f"kx_in2_{tag}", ids.nbytes, offset=64)
        outputs = [httpclient.InferRequestedOutput("output_ids"), httpclient.InferRequestedOutput("sequence_length")]
        outputs[0].set_shared_memory(f"kx_out_{tag}", 512)
        outputs[1].set_shared_memory(f"kx_out_{tag}", 8, offset=512)
        result = http_client.infer("tensorrt_llm", [ids_input, *tensors(core, "http")], outputs=outputs)
        assert result.get_output("output_ids").keys() == {"name", "datatype", "shape"}  # its data in shared memory
        want_ids, want_len = plain.as_numpy("output_ids"), plain.as_numpy("sequence_length")
        got_ids = shm.get_contents_as_numpy(regions["out"], np.int32, result.get_output("output_ids")["shape"],
                                            offset=1024)
        got_len = shm.get_contents_as_numpy(regions["out"], np.int32, [1, 1], offset=1024 + 512)
        assert got_ids.tolist() == want_ids.tolist() and got_len.tolist() == want_len.tolist()
        assert len(want_ids.reshape(-1)) > len(ids.reshape(-1))

        # refusals: a name taken, a slice past its region, an output too small, an unknown region
        assert _grpc_error(lambda: grpc_client.register_system_shared_memory(
            f"kx_in_{tag}", f"/kx_in_{tag}", 8)) == ("ALREADY_EXISTS", f"shared memory region 'kx_in_{tag}' already in manager")
        assert _http(served, "POST", f"/v2/systemsharedmemory/region/kx_in_{tag}/register",
                     {"key": f"/kx_in_{tag}", "offset": 0, "byte_size": 8})[0] == 400
        assert _grpc_error(lambda: grpc_client.register_system_shared_memory("kx_x", "/kx_no_such_key", 8)) == (
            "INTERNAL", "Unable to open shared memory region: '/kx_no_such_key'")
        assert _grpc_error(lambda: grpc_client.register_system_shared_memory("kx_x", "../etc/passwd", 8))[0] == \
            "INVALID_ARGUMENT"
        status, body = _http(served, "POST", "/v2/models/tensorrt_llm/infer", {"inputs": [
            {"name": "input_ids", "datatype": "INT32", "shape": list(ids.shape),
             "parameters": {"shared_memory_region": f"kx_in2_{tag}", "shared_memory_byte_size": ids.nbytes,
                            "shared_memory_offset": 1020}}]})
        assert (status, body) == (400, {"error": f"Invalid offset + byte size for shared memory region: 'kx_in2_{tag}'"})
        outputs[0].set_shared_memory(f"kx_out_{tag}", 4)
        ids_input.set_shared_memory(f"kx_in2_{tag}", ids.nbytes, offset=64)
        with pytest.raises(InferenceServerException, match="should be at least"):
            http_client.infer("tensorrt_llm", [ids_input, *tensors(core, "http")], outputs=outputs)
        http_client.unregister_system_shared_memory(f"kx_in2_{tag}")
        with pytest.raises(InferenceServerException, match=f"Unable to find shared memory region: 'kx_in2_{tag}'"):
            http_client.infer("tensorrt_llm", [ids_input, *tensors(core, "http")])
        assert _grpc_error(lambda: grpc_client.get_system_shared_memory_status(f"kx_in2_{tag}")) == (
            "NOT_FOUND", f"Unable to find system shared memory region: 'kx_in2_{tag}'")
    finally:
        grpc_client.unregister_system_shared_memory()
        for handle in regions.values():
            shm.destroy_shared_memory_region(handle)
    assert http_client.get_system_shared_memory_status() == []


# ---------------------------------------------------------------------------- metrics
def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _scrape(served) -> dict[str, float]:
    return _samples(requests.get(served.metrics_url, timeout=30).text)


def test_every_request_is_counted_per_protocol_and_metrics_answer_on_the_openai_port(served, grpc_client, http_client,
                                                                                      tokenizer):
    client = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0)
    base = client.models.list().data[0].id
    before = _scrape(served)
    generated = {"openai": 0, "kserve_grpc": 0, "kserve_http": 0}
    # N = 4 OpenAI requests (completion, chat, streamed, an adapter) ...
    generated["openai"] += client.completions.create(model=base, prompt="Hello", max_tokens=3,
                                                     temperature=0).usage.completion_tokens
    generated["openai"] += client.chat.completions.create(model="1", messages=[{"role": "user", "content": "Hi"}],
                                                          max_tokens=4, temperature=0).usage.completion_tokens
    chunks = list(client.completions.create(model=base, prompt="Once", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    generated["openai"] += chunks[-1].usage.completion_tokens
    generated["openai"] += client.completions.create(model="2", prompt="The", max_tokens=2,
                                                     temperature=0).usage.completion_tokens
    with pytest.raises(openai.BadRequestError):  # refused: counted as a failure, never a success
        client.completions.create(model=base, prompt="Hello", max_tokens=3, temperature=-1)
    # ... and M = 2 + 2 KServe requests (the ensemble and the core model, each protocol)
    for protocol, client_ in (("kserve_grpc", grpc_client), ("kserve_http", http_client)):
        wire = protocol.removeprefix("kserve_")
        text = client_.infer("ensemble", tensors(ensemble_inputs(
            "Hello there", 3, return_num_output_tokens=np.array([[True]], bool)), wire))
        generated[protocol] += int(text.as_numpy("num_output_tokens")[0, 0])
        core = client_.infer("tensorrt_llm", tensors(_core_request(tokenizer, "Hello", 4), wire))
        generated[protocol] += int(core.as_numpy("sequence_length")[0, 0]) - len(tokenizer.encode("Hello"))
    after = _scrape(served)
    on_openai_port = _samples(requests.get(served.openai_url.removesuffix("/v1") + "/metrics", timeout=30).text)
    assert requests.get(served.openai_url + "/metrics", timeout=30).status_code == 200  # AIPerf given the /v1 base

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    n, m = 4, 4
    core = 'model="tensorrt_llm",version="1"'
    assert delta(f"nv_inference_request_success{{{core}}}") == n + m
    assert delta(f"nv_inference_count{{{core}}}") == n + m
    tokens = 'model="tensorrt_llm",response_metric_type="total_output_tokens",version="1"'
    assert delta(f"nv_llm_output_token_len_count{{{tokens}}}") == n + m
    assert delta(f"nv_llm_output_token_len_sum{{{tokens}}}") == sum(generated.values())
    assert delta(f'nv_inference_first_response_histogram_ms_count{{{core}}}') == n + m
    for protocol, requests_, failures in (("openai", n, 1), ("kserve_grpc", 2, 0), ("kserve_http", 2, 0)):
        label = f'protocol="{protocol}"'
        assert delta(f'trtllm_bdlora_requests_total{{outcome="success",{label}}}') == requests_, protocol
        assert delta(f'trtllm_bdlora_requests_total{{outcome="failure",{label}}}') == failures, protocol
        assert delta(f"trtllm_bdlora_request_duration_seconds_count{{{label}}}") == requests_ + failures, protocol
        assert delta(f"trtllm_bdlora_time_to_first_response_seconds_count{{{label}}}") == requests_, protocol
        assert delta(f"trtllm_bdlora_generation_tokens_count{{{label}}}") == requests_, protocol
        assert delta(f"trtllm_bdlora_generation_tokens_sum{{{label}}}") == generated[protocol], protocol
    assert delta('trtllm_bdlora_prompt_tokens_sum{protocol="kserve_grpc"}') == (
        len(tokenizer.encode("Hello there")) + len(tokenizer.encode("Hello")))
    # the OpenAI port answers the same exposition (scraped a moment later: counters only moved forward)
    assert on_openai_port.keys() == after.keys()
    assert all(on_openai_port[k] >= after[k] for k in after if k.startswith(("nv_inference_request", "trtllm_bdlora_requests")))


def test_promtool_finds_nothing_but_the_documented_triton_names(served):
    """`promtool check metrics` (Debian's prometheus package; .ci/run installs it) on a scrape of every family."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("TRTLLM_BDLORA_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is not installed (apt-get install prometheus): CI requires it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    text = requests.get(served.openai_url.removesuffix("/v1") + "/metrics", timeout=30).text
    assert "trtllm_bdlora_requests_total" in text and "nv_llm_output_token_len_bucket" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    complaints = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()}
    assert complaints == TRITON_NAME_COMPLAINTS
    assert result.returncode != 0  # promtool does report them: the check above compared real output
    assert all(re.match(r"nv_inference_\w+ ", c) for c in complaints)

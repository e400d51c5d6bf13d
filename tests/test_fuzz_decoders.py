"""Fuzzing the request decoders with hypothesis, for a bounded number of examples (about 30 s in all):
in process, the gRPC and HTTP decoders and Triton's input checks raise nothing but RequestError; against the
session's `serve --tp 2`, random gRPC ModelInfer messages and HTTP bodies get only client-error statuses (never
UNKNOWN / INTERNAL / 500, never a traceback), and afterwards the server still gives the same greedy answer."""

import json
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from trtllm_bdlora.errors import RequestError
from trtllm_bdlora.serving.kserve.http import generate_inputs
from trtllm_bdlora.serving.kserve.tensors import from_grpc, from_http
from trtllm_bdlora.serving.repository.calls import check_inputs
from trtllm_bdlora.serving.repository.config import model_metadata, wire_type
from trtllm_bdlora.serving.repository.spec import DEFAULTS, MODELS

DATATYPES = ["BOOL", "INT8", "INT32", "INT64", "UINT8", "UINT64", "FP16", "FP32", "FP64", "BF16", "BYTES", "X", ""]
NAMES = ["text_input", "max_tokens", "input_ids", "input_lengths", "request_output_len", "temperature",
         "lora_task_id", "lora_weights", "lora_config", "stop_words", "bad_words", "end_id", "seed", "nope"]
MODEL_NAMES = ["ensemble", "tensorrt_llm", "preprocessing", "postprocessing", "tensorrt_llm_bls", "missing"]


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)


tensor_meta = st.tuples(st.sampled_from(NAMES), st.sampled_from(DATATYPES),
                        st.lists(st.integers(-2, 1 << 40) | st.integers(0, 4), max_size=4))
raw_payload = st.binary(max_size=48) | st.builds(
    lambda items: b"".join(len(i).to_bytes(4, "little") + i for i in items), st.lists(st.binary(max_size=8), max_size=3))
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["name", "datatype", "shape", "data", "parameters", "binary_data_size", "inputs", "outputs", "id",
         "binary_data_output", "binary_data", *NAMES]), inner, max_size=4), max_leaves=12)


def _grpc_request(model, metas, raws, use_raw, params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="fuzz")
    for name, datatype, shape in metas:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    if use_raw:
        request.raw_input_contents.extend(raws)
    for key, value in params.items():
        request.parameters[key].string_param = value
    return request


grpc_requests = st.builds(_grpc_request, st.sampled_from(MODEL_NAMES), st.lists(tensor_meta, max_size=4),
                          st.lists(raw_payload, max_size=5), st.booleans(),
                          st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))


def _wellformed(extras) -> pb.ModelInferRequest:
    """A valid 2-token tensorrt_llm request plus optional inputs of the declared type and a consistent byte size,
    with random values and shapes: these pass the decoder and reach the model's own checks."""
    inputs = {"input_ids": ("INT32", [1, 3], np.array([5, 6, 7], np.int32).tobytes()),
              "input_lengths": ("INT32", [1, 1], np.int32(3).tobytes()),
              "request_output_len": ("INT32", [1, 1], np.int32(2).tobytes())}
    for spec, dims, data in extras:
        datatype = wire_type(spec, DEFAULTS)
        size = {"BOOL": 1, "UINT8": 1, "INT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP16": 2}.get(datatype)
        shape = [1, *[d if d > 0 else n for d, n in zip(spec.dims, dims)]]
        count = int(np.prod(shape))
        if datatype == "BYTES":
            data = b"".join(len(data[i:i + 3]).to_bytes(4, "little") + data[i:i + 3] for i in range(count))
        else:
            data = (data * (count * size // max(len(data), 1) + 1))[: count * size] if data else bytes(count * size)
        inputs[spec.name] = (datatype, shape, data)
    return _grpc_request("tensorrt_llm", [(n, d, s) for n, (d, s, _) in inputs.items()],
                         [b for _, _, b in inputs.values()], True, {})


OPTIONAL = [t for t in MODELS["tensorrt_llm"].inputs if t.optional and t.name not in ("input_ids", "streaming")]
wellformed_requests = st.builds(_wellformed, st.lists(st.tuples(
    st.sampled_from(OPTIONAL), st.lists(st.integers(0, 4), min_size=2, max_size=2), st.binary(max_size=24)), max_size=3))
http_bodies = st.tuples(json_value, st.binary(max_size=32), st.none() | st.integers(-4, 120))


# ---------------------------------------------------------------------------- in process
@fuzz(800)
@given(grpc_requests)
def test_grpc_decoder_raises_only_request_errors(request):
    try:
        decoded = from_grpc(request)
        if request.model_name in MODELS:
            check_inputs(MODELS[request.model_name], decoded.inputs, DEFAULTS, 8)
    except RequestError:
        pass


@pytest.mark.filterwarnings("error::RuntimeWarning")
@fuzz(800)
@given(http_bodies)
def test_http_decoder_raises_only_request_errors(body):
    doc, tail, header_length = body
    data = json.dumps(doc).encode() + (tail if header_length is not None else b"")
    try:
        decoded = from_http("ensemble", data, header_length)
        check_inputs(MODELS["ensemble"], decoded.inputs, DEFAULTS, 8)
    except RequestError:
        pass


class _Repository:
    """What the generate extension's decoder reads of a ModelServer: each model's spec and wire metadata."""

    metadata = {name: model_metadata(model, DEFAULTS) for name, model in MODELS.items()}

    def model(self, name: str):
        if name not in MODELS:
            raise RequestError(f"unknown model {name}")
        return SimpleNamespace(spec=MODELS[name])


generate_bodies = st.one_of(json_value, st.dictionaries(st.sampled_from([*NAMES, "parameters"]), json_value, max_size=5))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a value numpy casts to inf is refused, not passed on
@fuzz(800)
@given(generate_bodies, st.sampled_from(MODEL_NAMES[:-1]))
@example({"parameters": True}, "ensemble")  # was an AttributeError (HTTP 500)
@example({"text_input": "a", "max_tokens": 4, "temperature": 1e300}, "ensemble")  # was cast to inf
def test_generate_decoder_raises_only_request_errors(doc, model):
    try:
        decoded = generate_inputs(_Repository(), model, doc)
        check_inputs(MODELS[model], decoded.inputs, DEFAULTS, 8)
    except RequestError:
        pass


# ---------------------------------------------------------------------------- against serve --tp 2
CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
CLIENT_HTTP = {400, 404, 429}
# Triton answers decoupled models over streams (gRPC) and the generate extension (HTTP) only: unary calls to them are
# refused (HTTP 501), so the fuzzed requests reach them over ModelStreamInfer
DECOUPLED = {name for name, model in MODELS.items() if model.decoupled or model.steps}


def _stream(stub, request) -> list:
    """The responses of one request sent alone on a ModelStreamInfer call."""
    return list(stub.ModelStreamInfer(iter([request]), timeout=60))


@pytest.fixture(scope="module")
def served(triton_served):
    return triton_served[0]


@pytest.fixture(scope="module")
def stub(served):
    channel = grpc.insecure_channel(served.url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _greedy(stub) -> list[int]:
    request = _grpc_request("tensorrt_llm", [("input_ids", "INT32", [1, 3]), ("input_lengths", "INT32", [1, 1]),
                                             ("request_output_len", "INT32", [1, 1])],
                            [np.array([5, 6, 7], np.int32).tobytes(), np.int32(3).tobytes(), np.int32(4).tobytes()],
                            True, {})
    out = _stream(stub, request)[0].infer_response
    names = [o.name for o in out.outputs]
    return np.frombuffer(out.raw_output_contents[names.index("output_ids")], np.int32).tolist()


def test_fuzzed_requests_never_break_the_server(served, stub):
    before = _greedy(stub)
    seen: dict[str, int] = {}

    @fuzz(200)
    @given(grpc_requests | wellformed_requests)
    def over_grpc(request):
        try:
            if request.model_name in DECOUPLED:
                errors = [r.error_message for r in _stream(stub, request) if r.error_message]
                seen["STREAM_ERROR" if errors else "OK"] = seen.get("STREAM_ERROR" if errors else "OK", 0) + 1
                assert all("\n" not in e and "Traceback" not in e for e in errors), errors
            else:
                stub.ModelInfer(request, timeout=30)
                seen["OK"] = seen.get("OK", 0) + 1
        except grpc.RpcError as err:
            seen[err.code().name] = seen.get(err.code().name, 0) + 1
            assert err.code() in CLIENT_CODES, (err.code(), err.details(), request)
            assert "Traceback" not in err.details() and "Exception calling" not in err.details()

    @fuzz(100)
    @given(http_bodies, st.sampled_from(["infer", "generate"]), st.sampled_from(MODEL_NAMES))
    @example(({"parameters": True}, b"", None), "generate", "ensemble")  # found by CI: was a 500
    def over_http(body, route, model):
        doc, tail, header_length = body
        data = json.dumps(doc).encode() + (tail if header_length is not None else b"")
        headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
        r = requests.post(f"http://{served.http_url}/v2/models/{model}/{route}", data=data, headers=headers, timeout=30)
        seen[f"HTTP {r.status_code}"] = seen.get(f"HTTP {r.status_code}", 0) + 1
        refused = r.status_code == 501 and route == "infer" and model in DECOUPLED  # as Triton refuses them
        assert r.status_code == 200 or r.status_code in CLIENT_HTTP or refused, (r.status_code, r.text, data)
        assert "Traceback" not in r.text

    over_grpc()
    over_http()
    print("FUZZ_OUTCOMES", json.dumps(seen, sort_keys=True))
    assert _greedy(stub) == before  # still serving, and serving the same

"""Every bad KServe request in one table, against the session's `serve --tp 2` (tests/conftest.py `triton_served`,
the decoupled repository as deployed): tensors of the wrong name, type, shape or value, malformed raw tensors,
malformed JSON, bad adapter inputs and bad sampling values. Each is refused with a one-line message naming the
problem, by each transport the row names: `grpc` (a stream's error to a decoupled model, which carries no status
code, as in Triton; INVALID_ARGUMENT from a unary call to a non-decoupled one) and `http` (400); and the next
request's greedy tokens still equal transformers'."""
# ruff: noqa: F811 - test arguments name the fixtures imported from test_triton_serve and test_serving_edge

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import serialize_byte_tensor

from tests.test_serving_edge import (  # noqa: F401 - its module fixture, shared (the same session server)
    PROMPT,
    STREAMED,
    _core_greedy,
    _refused,
    greedy_reference,
)
from tests.test_triton_serve import (  # noqa: F401 - its module fixtures, shared (the same session server)
    ensemble_inputs,
    grpc_client,
    http_client,
    served,
    tensors,
    tokenizer,
)
from trtllm_bdlora.cli.client import infer


@dataclass(frozen=True)
class Bad:
    """One bad request to `model`: typed tensors (`values`, sent as tritonclient sends them), raw tensors (`raw`:
    name, datatype, shape, bytes; gRPC ModelInfer and HTTP binary data) or a raw JSON body (`body` to `path`)."""

    model: str
    words: tuple[str, ...]
    via: tuple[str, ...] = ("grpc", "http")
    values: dict | None = None
    raw: list | None = None
    body: bytes | None = None
    path: str = "infer"


F32, I32, U64 = np.float32, np.int32, np.uint64


def _v(value, dtype=I32) -> np.ndarray:
    return np.array([[value]], dtype)


TEXT, FOUR = {"text_input": np.array([[b"Hello"]], dtype=object)}, {"max_tokens": _v(4)}


def bytes_tensor(*items: bytes) -> bytes:
    """Raw contents of a BYTES tensor (each element: 4-byte little-endian length, then the bytes)."""
    return serialize_byte_tensor(np.array(items, dtype=object)).item()


HI, TWO = ("QUERY", "BYTES", [1, 1], bytes_tensor(b"Hi")), ("REQUEST_OUTPUT_LEN", "INT32", [1, 1], b"\x02\0\0\0")
DEEP = b"[" * 100_000 + b"]" * 100_000


def _ensemble(*words: str, via=("grpc",), **values) -> Bad:
    return Bad("ensemble", words, via, values=values)


def _lora(task: int, **values) -> dict:
    return {**TEXT, **FOUR, "lora_task_id": _v(task, U64), **values}


def _sampling(name: str, value, dtype) -> Bad:
    return Bad("ensemble", (name,), values={**ensemble_inputs(PROMPT, 4), name: _v(value, dtype)})


def _json(path: str, body: bytes, field: str, model: str = "ensemble") -> Bad:
    return Bad(model, (field,), ("http",), body=body, path=path)


BAD_INPUTS = {
    # tensors: names, types, shapes (Triton's words)
    "missing text_input": _ensemble("missing required input(s) ['text_input']", **FOUR),
    "wrong dtype": _ensemble("'max_tokens' data-type is 'FP32', but model 'ensemble' expects 'INT32'",
                             **TEXT, max_tokens=_v(4, F32)),
    "wrong shape": _ensemble("unexpected shape for input 'text_input' for model 'ensemble'. Expected [-1,1], got [1,2]",
                             text_input=np.array([[b"a", b"b"]], dtype=object), **FOUR),
    "text_input NUL": _ensemble("text_input", text_input=np.array([[b"a\x00b"]], dtype=object), **FOUR),
    # lengths against the context
    "max_tokens too large": _ensemble("exceeds the context", **TEXT, max_tokens=_v(10**6)),
    "oversized prompt": _ensemble("does not fit the context", text_input=np.array([[b"word " * 5000]], dtype=object),
                                  **FOUR),
    # adapters
    "unknown task id": _ensemble("LoRA task 77 not found in cache. Please send LoRA weights with request",
                                 **_lora(77)),
    "malformed lora_config": _ensemble("needs", **_lora(78, lora_weights=np.zeros((1, 1, 64), np.float16),
                                                      lora_config=np.array([[[1, 0, 4]]], I32))),
    "malformed lora_weights": _ensemble("NaN", **_lora(79, lora_weights=np.full((1, 1, 1024), np.nan, np.float16),
                                                       lora_config=np.array([[[1, 0, 4]]], I32))),
    "weights without config": _ensemble("together", **_lora(80, lora_weights=np.zeros((1, 1, 8), np.float16))),
    # sampling values
    **{f"{name} {value}": _sampling(name, value, dtype) for name, value, dtype in [
        ("temperature", np.nan, F32), ("temperature", np.inf, F32), ("temperature", -1.0, F32),
        ("top_p", np.nan, F32), ("top_p", 1.5, F32), ("top_p", -np.inf, F32), ("top_k", -1, I32),
        ("repetition_penalty", 0.0, F32), ("repetition_penalty", np.nan, F32), ("presence_penalty", np.inf, F32),
        ("frequency_penalty", np.nan, F32), ("min_tokens", -1, I32), ("max_tokens", 0, I32), ("max_tokens", -5, I32),
        ("max_tokens", 2**31 - 1, I32), ("num_return_sequences", 0, I32)]},
    # raw tensors (preprocessing: not decoupled, so unary calls reach it)
    "int32 size": Bad("preprocessing", ("REQUEST_OUTPUT_LEN", "2 bytes"),
                      raw=[HI, ("REQUEST_OUTPUT_LEN", "INT32", [1, 1], b"\x01\x00")]),
    "fp32 size": Bad("preprocessing", ("EMBEDDING_BIAS_WEIGHTS", "7 bytes"),
                     raw=[HI, TWO, ("EMBEDDING_BIAS_WEIGHTS", "FP32", [1, 1], b"\0" * 7)]),
    "bytes length past the end": Bad("preprocessing", ("QUERY", "BYTES"),
                                     raw=[("QUERY", "BYTES", [1, 1], b"\x40\0\0\0Hi"), TWO]),
    "bytes count vs shape": Bad("preprocessing", ("QUERY", "shape"), raw=[("QUERY", "BYTES", [1, 2], HI[3]), TWO]),
    "non-UTF-8 text": Bad("preprocessing", ("QUERY", "UTF-8"),
                          raw=[("QUERY", "BYTES", [1, 1], bytes_tensor(b"caf\xe9 \xff")), TWO]),
    "negative shape": Bad("preprocessing", ("QUERY", "shape"), raw=[("QUERY", "BYTES", [1, -1], HI[3]), TWO]),
    "huge shape": Bad("preprocessing", ("REQUEST_OUTPUT_LEN", "elements"),
                      raw=[HI, ("REQUEST_OUTPUT_LEN", "INT32", [1 << 40, 1 << 40], b"")]),
    # JSON bodies (HTTP)
    "generate text_input lone surrogate": _json("generate", b'{"text_input": "\\ud800", "max_tokens": 2}', "text_input"),
    "generate text_input NUL": _json("generate", b'{"text_input": "a\\u0000b", "max_tokens": 2}', "text_input"),
    "generate lora_task_id -1": _json("generate", b'{"text_input": "hi", "max_tokens": 2, "lora_task_id": -1}',
                                      "lora_task_id"),
    "generate lora_task_id 2^64": _json(
        "generate", b'{"text_input": "hi", "max_tokens": 2, "lora_task_id": 18446744073709551616}', "lora_task_id"),
    "generate nested": _json("generate", DEEP, "nested"),
    "infer nested": _json("infer", DEEP, "nested", model="preprocessing"),
    "infer UINT64 -1": _json("infer", json.dumps({"inputs": [
        {"name": "PROMPT_TABLE_EXTRA_ID", "datatype": "UINT64", "shape": [1, 1], "data": [-1]}]}).encode(),
        "PROMPT_TABLE_EXTRA_ID", model="preprocessing"),
    "index nested": _json("/v2/repository/index", DEEP, "nested"),
}


def raw_request(model: str, raw: list) -> pb.ModelInferRequest:
    """A ModelInfer request carrying `raw` ((name, datatype, shape, bytes) per input) as raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, _ in raw:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(data for *_, data in raw)
    return request


def _raw_grpc(url: str, bad: Bad) -> None:
    with grpc.insecure_channel(url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw_request(bad.model, bad.raw), timeout=60)
    details = info.value.details()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    for word in bad.words:
        assert word in details, details
    assert "Traceback" not in details and "Exception calling" not in details and "\n" not in details.strip()


def _http_post(http_url: str, bad: Bad) -> None:
    if bad.raw is not None:
        header = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                                        for n, d, s, b in bad.raw]}).encode()
        data, headers = header + b"".join(b for *_, b in bad.raw), {"Inference-Header-Content-Length": str(len(header))}
    else:
        data, headers = bad.body, {"Content-Type": "application/json"}
    path = bad.path if bad.path.startswith("/") else f"/v2/models/{bad.model}/{bad.path}"
    response = requests.post(f"http://{http_url}{path}", data=data, headers=headers, timeout=60)
    message = response.json()["error"]
    assert response.status_code == 400, (response.status_code, message)
    for word in bad.words:
        assert word in message, message
    assert "Traceback" not in message and "\n" not in message.strip()


@pytest.fixture(scope="module")
def client(served):
    c = grpcclient.InferenceServerClient(served[0].url)
    yield c
    c.close()


CASES = [(case, via) for case, bad in BAD_INPUTS.items() for via in bad.via]


@pytest.mark.parametrize(("case", "via"), CASES, ids=[f"{case}-{via}" for case, via in CASES])
def test_bad_input_is_a_one_line_error_and_the_server_keeps_serving(case, via, served, client, grpc_client, http_client,
                                                                   tokenizer, greedy_reference):
    bad = BAD_INPUTS[case]
    server = served[0]
    if bad.values is not None:
        sender = grpc_client if via == "grpc" else http_client
        _refused(lambda: sender.infer(bad.model, tensors(bad.values, via)), STREAMED if via == "grpc" else "400",
                 *bad.words)
    elif via == "grpc":
        _raw_grpc(server.url, bad)
    else:
        _http_post(server.http_url, bad)
    ids, expected = greedy_reference
    assert grpc_client.is_server_ready()
    assert _core_greedy(grpc_client, ids, tokenizer.eos_token_id) == expected
    assert infer(client, "Hello", 3, 1)  # an adapter's request too

"""One error model (trtllm_bdlora/errors.py): for every error kind, the status a client sees on KServe gRPC, KServe
HTTP and the OpenAI API is the one row of the table, whatever raised it; and a full PEFT cache reaches a live
`serve` client as RESOURCE_EXHAUSTED / 429 on every protocol."""

import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from tests.helpers import make_peft_adapter
from tests.serving_helpers import Server, free_port
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.trtllm_format import convert_adapter
from trtllm_bdlora.errors import STATUS, BdLoraError, ErrorKind
from trtllm_bdlora.serving.kserve.grpc import start_server
from trtllm_bdlora.serving.kserve.http import build_app
from trtllm_bdlora.serving.metrics import Metrics
from trtllm_bdlora.serving.openai.api import create_app
from trtllm_bdlora.serving.repository.spec import DEFAULTS, MODELS

pytestmark = pytest.mark.unit


def error_of(kind: ErrorKind) -> BdLoraError:
    err = BdLoraError(f"an error of kind {kind.value}")
    err.kind = kind
    return err


class FailingRepository:
    """A repository whose every inference fails with `self.error`: what the KServe front ends make of it."""

    def __init__(self):
        from trtllm_bdlora.serving.repository.config import model_config, model_metadata

        self.error: BaseException = RuntimeError("unset")
        self.metrics = Metrics()
        self.models = {"tensorrt_llm": None}
        # a non-decoupled tensorrt_llm (`decoupled_mode=false`): unary calls reach it, as in Triton
        self.configs = {"tensorrt_llm": model_config(MODELS["tensorrt_llm"], {**DEFAULTS, "engine_dir": "e",
                                                                                "tokenizer_dir": "t", "tp_size": "1",
                                                                                "decoupled_mode": "false"})}
        self.metadata = {"tensorrt_llm": model_metadata(MODELS["tensorrt_llm"], DEFAULTS)}

    def model(self, name, version=""):
        return None

    def decoupled(self, name, version=""):
        return self.configs[name].model_transaction_policy.decoupled

    def infer(self, request, ctx, version=""):
        raise self.error


class FailingOpenAI:
    """An OpenAI server whose every generation fails with `self.error`."""

    def __init__(self):
        self.error: BaseException = RuntimeError("unset")

    async def generate(self, request, body, max_tokens, chat):
        raise self.error


@pytest.fixture(scope="module")
def front_ends():
    repo, openai_server = FailingRepository(), FailingOpenAI()
    port = free_port()
    grpc_server = start_server(repo, "127.0.0.1", port)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    yield repo, openai_server, client, TestClient(build_app(repo)), TestClient(create_app(openai_server))
    client.close()
    grpc_server.stop(None)


def _grpc_code(client) -> str:
    arrays = [("input_ids", np.array([[1, 2]], np.int32), "INT32"), ("input_lengths", np.array([[2]], np.int32), "INT32"),
              ("request_output_len", np.array([[4]], np.int32), "INT32")]
    with pytest.raises(InferenceServerException) as info:
        client.infer("tensorrt_llm", _inputs(grpcclient, arrays))
    return info.value.status().removeprefix("StatusCode.")


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_every_kind_has_one_status_on_every_protocol(kind, front_ends):
    repo, openai_server, grpc_client, kserve_http, openai_http = front_ends
    status = STATUS[kind]
    repo.error = openai_server.error = error_of(kind)
    assert _grpc_code(grpc_client) == status.grpc
    body = {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT32", "data": [1, 2]}]}
    response = kserve_http.post("/v2/models/tensorrt_llm/infer", json=body)
    assert response.status_code == status.http and response.json() == {"error": f"an error of kind {kind.value}"}
    response = openai_http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    error = response.json()["error"]
    assert response.status_code == status.http == error["code"] and error["type"] == status.openai_type


def test_unexpected_exceptions_are_internal_everywhere(front_ends):
    repo, openai_server, grpc_client, kserve_http, openai_http = front_ends
    repo.error = openai_server.error = KeyError("slot table")
    assert _grpc_code(grpc_client) == "INTERNAL"
    assert kserve_http.post("/v2/models/tensorrt_llm/infer", json={"inputs": []}).status_code == 500
    assert TestClient(openai_http.app, raise_server_exceptions=False).post(
        "/v1/completions", json={"model": "m", "prompt": "hi"}).status_code == 500


def test_table_covers_every_kind_with_retryable_codes_where_clients_retry():
    assert set(STATUS) == set(ErrorKind)
    assert STATUS[ErrorKind.RESOURCE_EXHAUSTED].http == 429 and STATUS[ErrorKind.UNAVAILABLE].http == 503
    from trtllm_bdlora.errors import AdapterCacheFullError, AdapterNotCachedError, ServerBusyError

    assert AdapterCacheFullError("PEFT Cache is full").status.grpc == "RESOURCE_EXHAUSTED"
    assert ServerBusyError("Exceeds maximum queue size").status.http == 429
    assert AdapterNotCachedError(3).status.grpc == "NOT_FOUND"


@pytest.mark.serve
def test_full_peft_cache_is_resource_exhausted_on_every_protocol(tiny_llama_with_tokenizer, tmp_path):
    """The pinned --adapter adapter (48 KiB per rank) fills the 60 kB host cache: an adapter sent with a request, or loaded through the
    OpenAI API, cannot be stored, and every protocol answers the retryable RESOURCE_EXHAUSTED / 429."""
    model = tiny_llama_with_tokenizer
    pinned = make_peft_adapter(model, tmp_path / "pinned", seed=1, r=8)
    extra = make_peft_adapter(model, tmp_path / "root" / "extra", seed=2, r=8)
    weights, config = convert_adapter(load_peft_adapter(extra), 2, "float16")  # the type the repository declares
    # a non-decoupled repository (`--set decoupled_mode=false`): unary calls reach tensorrt_llm, as in Triton
    server = Server(model, {1: pinned}, tp=2, extra=("--lora-cache-host-bytes", "60000", "--allow-adapter-loading",
                                                      "--adapter-root", str(tmp_path / "root"),
                                                      "--set", "decoupled_mode=false"))
    arrays = [("input_ids", np.array([[3, 4, 5]], np.int32), "INT32"), ("input_lengths", np.array([[3]], np.int32), "INT32"),
              ("request_output_len", np.array([[2]], np.int32), "INT32"),
              ("lora_task_id", np.array([[9]], np.uint64), "UINT64"),
              ("lora_weights", weights.astype(np.float16), "FP16"),
              ("lora_config", config.astype(np.int32), "INT32")]
    try:
        server.wait_ready()
        client = grpcclient.InferenceServerClient(server.url)
        with pytest.raises(InferenceServerException) as info:  # a stream's error responses carry no status code
            list(_stream(client, _inputs(grpcclient, arrays)))
        assert str(info.value).startswith("PEFT Cache is full")
        with pytest.raises(InferenceServerException) as info:
            client.infer("tensorrt_llm", _inputs(grpcclient, arrays))
        assert "PEFT Cache is full" in str(info.value) and info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        http = httpclient.InferenceServerClient(server.http_url)
        with pytest.raises(InferenceServerException) as info:
            http.infer("tensorrt_llm", _inputs(httpclient, arrays))
        assert "PEFT Cache is full" in str(info.value) and info.value.status() == "429"
        request = urllib.request.Request(server.openai_url + "/load_lora_adapter", method="POST",
                                         data=json.dumps({"lora_name": "extra", "lora_path": "extra"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=60)
        body = json.loads(http_error.value.read())
        assert http_error.value.code == 429 and body["error"]["type"] == "RateLimitError"
        assert body["error"]["message"].startswith("PEFT Cache is full")
    finally:
        assert server.stop() == 0, server.output()[-3000:]


def _inputs(client_module, arrays):
    out = []
    for name, array, dtype in arrays:
        t = client_module.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def _stream(client, inputs):
    """One decoupled request over ModelStreamInfer; raises the error response it gets."""
    import queue

    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("tensorrt_llm", inputs, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise error
            yield result
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return
    finally:
        client.stop_stream()


def test_grpc_status_names_are_real_grpc_codes():
    assert all(hasattr(grpc.StatusCode, s.grpc) for s in STATUS.values())

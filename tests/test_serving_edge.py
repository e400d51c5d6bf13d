"""Edge checks of `serve --tp 2` (the session's shared server, probed with tritonclient and raw gRPC / HTTP):
non-finite adapter weights get per-request errors and the next request is still right (greedy tokens equal
transformers'); adapter ids keep the weights they were registered with; health answers within 1 s with 100 idle
streams open; an HTTP body over the limit is refused before it is read. Bad sampling values and malformed tensors:
tests/test_bad_input_kserve.py (the one table of bad KServe inputs)."""
# ruff: noqa: F811 - test arguments name the fixtures imported from test_triton_serve

import queue
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.serving_helpers import infer as stream_infer
from tests.test_adapter_cache import random_request_adapter
from tests.test_triton_serve import (  # noqa: F401 - its module fixtures, shared (the same session server)
    core_inputs,
    ensemble_inputs,
    grpc_client,
    http_client,
    served,
    tensors,
    tokenizer,
)
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.trtllm_format import convert_adapter
from trtllm_bdlora.llama.loader import load_model_config

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def greedy_reference(served, tokenizer):
    """Greedy tokens of PROMPT from transformers (the independent reference a correct answer must equal)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(served[1], torch_dtype=torch.float32).eval()
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.eos_token_id)
    return ids, out[0, len(ids):].tolist()


def _core_greedy(client, ids, end_id, **extra):
    values = core_inputs(ids, 6, end_id, end_id, exclude_input_in_output=np.array([[True]], bool), **extra)
    protocol = "http" if getattr(client, "http_url", None) else "grpc"
    return client.infer("tensorrt_llm", tensors(values, protocol)).as_numpy("output_ids").reshape(-1).tolist()


# a decoupled model's error reaches a gRPC client on its stream, which carries a message and no status code (as in
# Triton); over HTTP (the generate extension) it has the status
STREAMED = None


def _refused(call, status: str | None, *words: str) -> str:
    """Run `call`; it must fail with `status` (gRPC code name, HTTP status, or STREAMED: a stream's error, which has
    none) and a message naming `words`."""
    with pytest.raises(InferenceServerException) as info:
        call()
    message = str(info.value.message() or info.value)
    assert str(status) in str(info.value.status()), (info.value.status(), message)
    for word in words:
        assert word in message, message
    assert "Traceback" not in message and "\n" not in message.strip()
    return message


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_non_finite_or_overflowing_adapter_weights_are_refused(protocol, served, grpc_client, http_client, tokenizer,
                                                               greedy_reference):
    client = grpc_client if protocol == "grpc" else http_client
    invalid = STREAMED if protocol == "grpc" else "400"
    shape = load_model_config(str(served[1]))
    weights, config = random_request_adapter(shape, 8, 41)  # float16: the type the repository declares
    ids, expected = greedy_reference
    task = 710 if protocol == "grpc" else 711
    for poison in (np.nan, np.inf, -np.inf):
        bad = weights.copy()
        bad[0, 3, 5] = poison
        lora = {"lora_task_id": np.array([[task]], np.uint64), "lora_weights": bad, "lora_config": config}
        _refused(lambda lo=lora: _core_greedy(client, ids, tokenizer.eos_token_id, **lo), invalid, "lora")
    # the id was never registered by the refused requests (an unknown adapter: NOT_FOUND, errors.STATUS), and the
    # server still answers right
    _refused(lambda: _core_greedy(client, ids, tokenizer.eos_token_id, lora_task_id=np.array([[task]], np.uint64)),
             STREAMED if protocol == "grpc" else "404", "not found in cache")
    assert _core_greedy(client, ids, tokenizer.eos_token_id) == expected


def test_adapter_weights_beyond_float16_are_refused():
    """A float32 or bfloat16 engine's lora_weights can hold values no float16 (or bf16-trained adapter) has: refused."""
    from trtllm_bdlora.errors import InputError
    from trtllm_bdlora.serving.repository.core import CoreModel

    weights = np.full((1, 2, 8), 0.5, np.float32)
    weights[0, 1, 3] = 1e38
    with pytest.raises(InputError, match="lora_weights holds 1e\\+38, beyond 65504 \\(the largest float16\\)"):
        CoreModel._lora({"lora_weights": weights, "lora_config": np.ones((1, 2, 3), np.int32)}, 0)


# ---------------------------------------------------------------------------- adapter ownership (17.3)
def test_adapter_id_keeps_its_first_weights(served, grpc_client, tokenizer, greedy_reference):
    shape = load_model_config(str(served[1]))
    ids, _ = greedy_reference
    end = tokenizer.eos_token_id
    first, config = random_request_adapter(shape, 8, 51)  # float16: the type the repository declares
    other, _ = random_request_adapter(shape, 8, 52)

    def run(task, weights=None, cfg=None, client=grpc_client):
        lora = {"lora_task_id": np.array([[task]], np.uint64)}
        if weights is not None:
            lora.update(lora_weights=weights, lora_config=cfg)
        return _core_greedy(client, ids, end, **lora)

    owned = run(720, first, config)
    assert run(730, other, config) != owned  # the two adapters answer differently: a mix-up would show
    message = _refused(lambda: run(720, other, config), STREAMED, "lora_task_id 720", "different lora_weights")
    print("OWNERSHIP_REFUSAL", message)
    assert run(720) == owned  # the original keeps serving
    assert run(720, first.copy(), config) == owned  # the same values again: accepted
    # another type is refused before anything else, as Triton refuses it (the repository declares FP16)
    _refused(lambda: run(720, first.astype(np.float32), config), STREAMED, "'lora_weights' data-type is 'FP32'")
    nudged = first.copy()
    nudged.reshape(-1)[5] = np.nextafter(nudged.reshape(-1)[5], np.float16(1))  # one float16 step away: others
    _refused(lambda: run(720, nudged, config), STREAMED, "different lora_weights")


def test_startup_ids_are_immutable(served, grpc_client, tokenizer, greedy_reference):
    """Adapter 1 was registered with --adapter: other weights for it are refused; its own `convert-adapter` form
    (any float type) is accepted and changes nothing."""
    shape = load_model_config(str(served[1]))
    ids, _ = greedy_reference
    end = tokenizer.eos_token_id
    task = {"lora_task_id": np.array([[1]], np.uint64)}
    registered = _core_greedy(grpc_client, ids, end, **task)
    weights, config = random_request_adapter(shape, 8, 61)
    _refused(lambda: _core_greedy(grpc_client, ids, end, **task, lora_weights=weights, lora_config=config),
             STREAMED, "lora_task_id 1", "start-up")
    own_w, own_c = convert_adapter(load_peft_adapter(served[2][1]), tp=2, dtype="float16")
    assert _core_greedy(grpc_client, ids, end, **task, lora_weights=own_w, lora_config=own_c) == registered
    assert _core_greedy(grpc_client, ids, end, **task) == registered


# ---------------------------------------------------------------------------- liveness under load (17.4)
class IdleStream:
    """A ModelStreamInfer call that sends nothing until closed (as an idle streaming client)."""

    def __init__(self, stub):
        self.requests: queue.Queue = queue.Queue()
        self.call = stub.ModelStreamInfer(iter(self.requests.get, None))
        self.error: list = []
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as err:
            self.error.append(err)

    def close(self):
        self.requests.put(None)
        self.call.cancel()


def test_health_answers_within_a_second_with_100_idle_streams(served):
    channels = [grpc.insecure_channel(served[0].url) for _ in range(4)]
    streams = [IdleStream(pb_grpc.GRPCInferenceServiceStub(channels[i % 4])) for i in range(100)]
    try:
        time.sleep(2)  # every stream is open on the server
        assert not any(s.error for s in streams), [s.error for s in streams if s.error][:1]
        client = grpcclient.InferenceServerClient(served[0].url)
        worst = 0.0
        for _ in range(5):
            t0 = time.monotonic()
            assert client.is_server_live() and client.is_server_ready()
            assert client.get_model_metadata("ensemble").name == "ensemble"
            assert requests.get(f"http://{served[0].http_url}/v2/health/live", timeout=1).status_code == 200
            worst = max(worst, time.monotonic() - t0)
        print(f"LIVENESS_100_STREAMS worst {worst * 1000:.1f} ms (gRPC live + ready + metadata, HTTP live)")
        assert worst < 1.0
        assert stream_infer(grpcclient.InferenceServerClient(served[0].url), "ensemble",
                            tensors(ensemble_inputs(PROMPT, 2))).as_numpy("text_output") is not None
        client.close()
    finally:
        for s in streams:
            s.close()
        for c in channels:
            c.close()


def test_http_body_over_the_limit_is_refused_before_reading(served):
    from trtllm_bdlora.serving.kserve.grpc import MAX_MESSAGE_BYTES

    url = f"http://{served[0].http_url}/v2/models/ensemble/infer"
    response = requests.post(url, data=b"{" * (MAX_MESSAGE_BYTES + 1), timeout=60)
    assert response.status_code == 413 and "limit" in response.json()["error"], response.text
    response = requests.post(f"http://{served[0].http_url}/v2/repository/index", data=b"{not json", timeout=60)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    assert requests.get(f"http://{served[0].http_url}/v2/health/live", timeout=5).status_code == 200

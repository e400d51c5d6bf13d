"""A real tritonclient against `serve --tp 2` under mpirun: equality with `generate`, streaming,
concurrency with adapter eviction and first-use registration, an oversized message refused while serving on (the
other bad inputs: tests/test_bad_input_kserve.py)."""

import json
import statistics
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.helpers import run_cli
from tests.serving_helpers import infer as stream_infer
from trtllm_bdlora.cli.client import converted_adapter, infer, stream

PROMPTS = ["Hello there", "The capital of France is", "Once upon a time", "List three colors:"]


@pytest.fixture(scope="module")
def served(triton_served):
    return triton_served


@pytest.fixture
def client(served):
    c = grpcclient.InferenceServerClient(served[0].url)
    yield c
    c.close()


def test_responses_equal_generate_and_streaming(served, client):
    server, model, adapters = served
    requests = [{"id": i, "adapter": a, "prompt": p, "max_tokens": 12}
                for i, (a, p) in enumerate([(1, PROMPTS[0]), (2, PROMPTS[1]), (3, PROMPTS[2]), (None, PROMPTS[3])])]
    res = run_cli("generate", "--model", str(model), "--tp", "2", "--requests", "-",
                  *[x for t in (1, 2, 3) for x in ("--adapter", f"{t}={adapters[t]}")],
                  stdin="\n".join(json.dumps(r) for r in requests) + "\n")
    assert res.returncode == 0, res.stderr[-2000:]
    expected = [json.loads(line)["text"] for line in res.stdout.splitlines()]
    for req, want in zip(requests, expected):
        got = infer(client, req["prompt"], 12, req["adapter"])
        assert got == want
        deltas = []
        assert stream(client, req["prompt"], 12, req["adapter"], on_text=deltas.append) == want
        assert len(deltas) > 1  # token by token


def test_metadata_and_health(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("ensemble")
    meta = client.get_model_metadata("ensemble")
    assert {i.name for i in meta.inputs} >= {"text_input", "max_tokens", "lora_task_id", "lora_weights", "lora_config"}
    # the upstream ensemble's outputs (issue 10): text_output first, then the log-prob / logit / index / perf outputs
    assert [o.name for o in meta.outputs][0] == "text_output"
    assert {o.name for o in meta.outputs} == {"text_output", "cum_log_probs", "output_log_probs", "context_logits",
                                              "generation_logits", "batch_index", "sequence_index",
                                              "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks",
                                              "kv_cache_alloc_total_blocks", "arrival_time_ns", "first_scheduled_time_ns",
                                              "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
                                              "total_accepted_draft_tokens", "total_draft_tokens", "num_input_tokens",
                                              "num_output_tokens"}
    assert client.get_model_config("ensemble").config.name == "ensemble"
    # all five upstream models are served now (the core model was not before issue 10)
    assert all(client.is_model_ready(m) for m in ("preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls"))
    assert not client.is_model_ready("no_such_model")


def _one(client, text, max_tokens, task_id, lora_dir, tp=2):
    try:
        return infer(client, text, max_tokens, task_id)
    except InferenceServerException as err:
        if "not found in cache" not in str(err):
            raise
        return infer(client, text, max_tokens, task_id, converted_adapter(lora_dir, tp))


def test_concurrent_clients_with_eviction(served, tmp_path_factory):
    """16 clients x 8 requests over 4 adapters (adapter 4 registered by its first request), 2 slots per rank."""
    server, _, adapters = served
    combos = [(p, a) for p in PROMPTS for a in (1, 2, 3, 4)]
    ref_client = grpcclient.InferenceServerClient(server.url)
    reference = {(p, a): _one(ref_client, p, 8, a, adapters[4]) for p, a in combos}
    ref_client.close()
    assert len({reference[(PROMPTS[0], a)] for a in (1, 2, 3, 4)}) == 4  # adapters really differ

    failures, latencies, mismatches = [], [], []
    lock = threading.Lock()

    def worker(k):
        c = grpcclient.InferenceServerClient(server.url)
        try:
            for i in range(8):
                prompt, task = combos[(k * 8 + i * 5) % len(combos)]
                t0 = time.perf_counter()
                try:
                    text = _one(c, prompt, 8, task, adapters[4])
                except Exception as err:  # noqa: BLE001 - counted as a failure
                    with lock:
                        failures.append(str(err))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if text != reference[(prompt, task)]:
                        mismatches.append((prompt, task, text))
        finally:
            c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    assert failures == [] and mismatches == []
    assert len(latencies) == 128
    q = statistics.quantiles(latencies, n=100)
    report = {"requests": 128, "wall_s": wall, "req_per_s": 128 / wall, "p50_s": q[49], "p99_s": q[98]}
    print("LOAD", json.dumps(report))
    (tmp_path_factory.getbasetemp() / "load_report.json").write_text(json.dumps(report))


def _raw_infer(client, inputs):
    """The ensemble is decoupled: it answers streams, as in Triton."""
    return stream_infer(client, "ensemble", inputs)


def _input(name, array, dtype):
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _text(s="Hello"):
    return _input("text_input", np.array([[s.encode()]], dtype=object), "BYTES")


def _max(n=4, dtype=np.int32, kind="INT32"):
    return _input("max_tokens", np.array([[n]], dtype=dtype), kind)


def test_oversized_message_rejected(client):
    huge = _input("lora_weights", np.zeros((1, 1, 40_000_000), np.float16), "FP16")
    with pytest.raises(InferenceServerException) as info:
        _raw_infer(client, [_text(), _max(), huge])
    assert "RESOURCE_EXHAUSTED" in str(info.value) or "larger than max" in str(info.value)
    assert infer(client, "Hello", 3, 2)

"""One `serve --tp 2` (tiny random Llama, hidden 256, 4 layers, context 4096, --max-num-tokens 256) probed from
outside: abandoned requests (client deadline) leave the batch, a short request is not stalled by long prompts in
prefill (whose outputs equal transformers'), oversized texts and context overflows are refused at once, a request
whose adapter makes the logits non-finite fails alone, and every request leaves one access-log line."""

import json
import os
import re
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.helpers import make_tiny_llama
from tests.serve_with_faults import FAULT_ADAPTER_ENV
from tests.serving_helpers import DecoupledAware, Server
from tests.test_adapter_cache import random_request_adapter
from trtllm_bdlora.llama.loader import load_model_config

CONTEXT = 4096
BUDGET = 256  # --max-num-tokens
FAULT_ADAPTER = 11  # sampling raises for this adapter's requests (tests/serve_with_faults.py)
SEED = int.from_bytes(os.urandom(4), "little")  # fresh prompts every run; printed in failures
VOCAB = 49152


def request_adapter_bytes_per_rank(model, rank: int) -> int:
    """Host-cache bytes the largest rank keeps for a `random_request_adapter` of `rank` at TP 2."""
    from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm
    from trtllm_bdlora.engine.adapter_pool import AdapterPool, shards_nbytes
    from trtllm_bdlora.sharding import make_layout

    shape = load_model_config(str(model))
    adapter = adapter_from_trtllm(*random_request_adapter(shape, rank, 0), shape, tp=2)
    pools = [AdapterPool(make_layout(shape, 2), r, "bdlora", 1, torch.float32, torch.device("cpu")) for r in range(2)]
    return max(shards_nbytes(pool.prepare(adapter)) for pool in pools)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("scheduler") / "model", hidden=256, layers=4, tokenizer=True)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (model / "config.json").write_text(json.dumps(config))
    cache = int(1.6 * request_adapter_bytes_per_rank(model, 16))  # one rank-16 request adapter and a rank-8 one
    server = Server(model, {}, tp=2, max_loras=2, module="tests.serve_with_faults", env={FAULT_ADAPTER_ENV: str(FAULT_ADAPTER)},
                    extra=["--max-num-tokens", str(BUDGET), "--max-batch-size", "16", "--log-level", "info",
                           "--lora-cache-host-bytes", str(cache)])
    try:
        server.wait_ready()
        yield server, model
    finally:
        assert server.stop() == 0, server.output()[-3000:]


@pytest.fixture
def client(served):
    """`infer` reaches the decoupled models over a stream (as Triton allows), deadline and request id included."""
    c = grpcclient.InferenceServerClient(served[0].url)
    yield DecoupledAware(c, url=served[0].url)
    c.close()


def _tensors(values: dict):
    out = []
    for name, array in values.items():
        t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def core(ids, max_tokens, **extra):
    """tensorrt_llm inputs, greedy, no end id (no stop on a token)."""
    values = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
              "request_output_len": np.array([[max_tokens]], np.int32)}
    values.update(extra)
    return _tensors(values)


def generated(result, prompt_len: int) -> list[int]:
    return result.as_numpy("output_ids").reshape(-1)[prompt_len:].tolist()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def access_lines(server) -> list[dict]:
    """The server's access-log lines as dicts (logfmt; JSON-quoted values)."""
    out = []
    for line in server.output().splitlines():
        if " trtllm_bdlora.access " not in line:
            continue
        fields = {}
        for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line.split(" trtllm_bdlora.access ", 1)[1]):
            fields[key] = json.loads(value) if value.startswith('"') else value
        out.append(fields)
    return out


def test_abandoned_requests_leave_the_batch(served, client):
    """16 requests of 3000 tokens whose clients give up after 2 s (gRPC deadline) fill the batch (16); a 4-token
    request sent right after them must finish within SHORT_BOUND_S, not after the abandoned ones (minutes)."""
    server, _ = served
    short = core(random_ids(8, SEED), 4)
    started = time.monotonic()
    client.infer("tensorrt_llm", short, request_id="alone")
    alone_s = time.monotonic() - started
    errors = []

    def long_request(i):
        try:
            client.infer("tensorrt_llm", core(random_ids(16, SEED + i), 3000), request_id=f"abandoned-{i}",
                         client_timeout=2.0)
        except InferenceServerException as err:
            errors.append(str(err))

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 16 and all("Deadline" in e for e in errors), errors[:2]
    started = time.monotonic()
    client.infer("tensorrt_llm", short, request_id="after-abandoned")
    after_s = time.monotonic() - started
    print(f"\nshort request: alone {alone_s:.2f} s, right after 16 abandoned long ones {after_s:.2f} s")
    assert after_s < 3.0 + alone_s, (alone_s, after_s)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cancelled = [f for f in access_lines(server) if f["id"].startswith("abandoned-")]
        if len(cancelled) == 16:
            break
        time.sleep(0.2)
    assert len(cancelled) == 16 and all(f["outcome"] == "cancelled" for f in cancelled), cancelled
    assert max(int(f["tokens_out"]) for f in cancelled) < 1000, cancelled  # dropped, not finished unread


def test_short_request_not_stalled_by_long_prefills(served, client):
    """Four 2000-token prompts are prefilled in chunks of at most 256 tokens a step; a 4-token request sent while
    they prefill finishes within a third of the time they take (unchunked, it waits for all of them); their
    outputs (two checked, for time) equal transformers' greedy generation."""
    server, model = served
    prompts = [random_ids(2000, SEED + 100 + i) for i in range(4)]
    finished, outputs = {}, {}

    def long_request(i):
        result = client.infer("tensorrt_llm", core(prompts[i], 3), request_id=f"long-{i}")
        finished[i] = time.monotonic()
        outputs[i] = generated(result, len(prompts[i]))

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.5)
    sent = time.monotonic()
    client.infer("tensorrt_llm", core(random_ids(8, SEED), 4), request_id="short-during-prefill")
    short_done = time.monotonic()
    for t in threads:
        t.join()
    print(f"\nshort request during prefill: {short_done - sent:.2f} s; long prompts done after "
          f"{min(finished.values()) - start:.2f} to {max(finished.values()) - start:.2f} s")
    all_prefilled = max(finished.values()) - start
    assert short_done - sent < min(all_prefilled / 3, 10.0), (short_done - sent, all_prefilled)

    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(model).eval()
    for i, prompt in [(0, prompts[0]), (3, prompts[3])]:
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=3, min_new_tokens=3,
                                          do_sample=False)[0, len(prompt):].tolist()
        assert outputs[i] == expected, f"seed {SEED}, prompt {i}"


def test_oversized_text_refused_before_tokenizing(served, client):
    text = np.array([[("word " * (4 << 20)).encode()]], dtype=object)  # 20 MiB
    values = {"text_input": text, "max_tokens": np.array([[4]], np.int32)}
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as err:
        client.infer("ensemble", _tensors(values))
    took = time.monotonic() - started
    print(f"\n20 MiB text_input refused in {took:.2f} s")
    assert "text_input of 20971520 bytes cannot fit the context of 4096 tokens" in str(err.value), err.value
    assert took < 5.0


def test_context_overflow_is_a_per_request_error(served, client):
    ids = random_ids(100, SEED)
    with pytest.raises(InferenceServerException) as err:
        client.infer("tensorrt_llm", core(ids, CONTEXT - 50))
    assert "request_output_len 4046 with a 100-token prompt (4146 tokens) exceeds the context of 4096" in str(err.value)
    values = {"text_input": np.array([["Hello there"]], dtype=object), "max_tokens": np.array([[CONTEXT]], np.int32)}
    with pytest.raises(InferenceServerException) as err:
        client.infer("ensemble", _tensors(values))
    assert re.search(r"max_tokens 4096 with a \d+-token prompt \(\d+ tokens\) exceeds the context of 4096",
                     str(err.value)), err.value
    assert len(generated(client.infer("tensorrt_llm", core(ids, 3)), 100)) == 3


def test_fault_in_one_request_fails_only_that_request(served, client):
    """An exception while sampling one request (injected for adapter FAULT_ADAPTER; NaN logits and failing callbacks
    take the same path, tests/test_serving_scheduler.py) fails that request alone, while a request in the same
    steps gets its usual tokens, and the server keeps serving. (Adapter weights that would overflow the activations
    are refused at the edge: tests/test_serving_edge.py.)"""
    server, model = served
    shape = load_model_config(str(model))
    weights, config = random_request_adapter(shape, 8, SEED)  # float16: the declared type
    ids = random_ids(12, SEED + 7)
    expected = generated(client.infer("tensorrt_llm", core(ids, 16)), 12)
    bad = core(random_ids(10, SEED), 16, lora_task_id=np.array([[FAULT_ADAPTER]], np.uint64), lora_weights=weights,
               lora_config=config, runtime_top_k=np.array([[5]], np.int32), temperature=np.array([[1.0]], np.float32))
    result = {}

    def good_request():
        result["good"] = generated(client.infer("tensorrt_llm", core(ids, 16), request_id="beside-fault"), 12)

    thread = threading.Thread(target=good_request)
    thread.start()
    with pytest.raises(InferenceServerException) as err:
        client.infer("tensorrt_llm", bad, request_id="faulty")
    thread.join()
    assert "internal error while serving this request" in str(err.value), err.value
    assert "injected fault" not in str(err.value) and "RuntimeError" not in str(err.value)  # the log has them, not clients
    assert result["good"] == expected
    assert generated(client.infer("tensorrt_llm", core(ids, 16)), 12) == expected
    assert client.is_server_live() and client.is_server_ready()
    line = next(f for f in access_lines(server) if f["id"] == "faulty")
    assert line["outcome"] == "error" and "injected fault" in line["error"] and line["adapter"] == str(FAULT_ADAPTER)


def test_access_log_and_adapter_events(served, client):
    server, model = served
    shape = load_model_config(str(model))
    client.infer("ensemble", _tensors({"text_input": np.array([["Hello there"]], dtype=object),
                                       "max_tokens": np.array([[5]], np.int32)}), request_id="logged")
    for task_id in (21, 22, 23):  # the host cache holds one of these: registering the next evicts
        weights, config = random_request_adapter(shape, 16, task_id)
        client.infer("tensorrt_llm", core(random_ids(6, task_id), 2, lora_task_id=np.array([[task_id]], np.uint64),
                                          lora_weights=weights, lora_config=config), request_id=f"adapter-{task_id}")
    time.sleep(0.5)
    line = next(f for f in access_lines(server) if f["id"] == "logged")
    assert line["model"] == "ensemble" and line["adapter"] == "-" and line["outcome"] == "length"
    assert int(line["tokens_out"]) == 5 and int(line["tokens_in"]) > 0
    assert float(line["queue_ms"]) >= 0 and float(line["compute_ms"]) > 0
    lines = {f["id"]: f for f in access_lines(server)}
    assert lines["adapter-23"]["adapter"] == "23" and lines["adapter-23"]["model"] == "tensorrt_llm"
    log = server.output()
    assert re.search(r"INFO trtllm_bdlora.adapters adapter registered task_id=23 source=request bytes=\d+", log)
    assert re.search(r"INFO trtllm_bdlora.adapters adapter evicted task_id=(11|21|22) reason=lru for=2[23]", log)


def test_startup_phases_are_logged_with_durations(served):
    """Every start-up phase of `serve --tp 2` has a line with its duration, in order, then one `serving` line; no
    progress-bar carriage returns in the log file."""
    server, _ = served
    log = server.output()
    assert "\r" not in log
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO "
    order = [r"trtllm_bdlora\.startup checks done seconds=\d+\.\d",
             r"trtllm_bdlora\.startup starting ranks tp=2 interface=lo",
             r"trtllm_bdlora\.startup ranks started tp=2 seconds=\d+\.\d",
             r"trtllm_bdlora\.startup loading weights done seconds=\d+\.\d",
             r"trtllm_bdlora\.startup building the engine done seconds=\d+\.\d",
             r"trtllm_bdlora\.startup opening the endpoints done seconds=\d+\.\d",
             r"trtllm_bdlora\.server serving models=ensemble,postprocessing,preprocessing,tensorrt_llm,tensorrt_llm_bls "
             rf"host=127\.0\.0\.1 grpc_port={server.port} .* tp=2 .* ready_seconds=\d+\.\d"]
    at = 0
    for pattern in order:
        found = re.compile(stamp + pattern).search(log, at)
        assert found, (pattern, log[-3000:])
        at = found.end()
    assert len(re.findall(stamp + r"trtllm_bdlora\.startup loading weights done", log)) == 1  # rank 0's only

"""Overload, port and shutdown behaviour of one `serve --tp 2` with small limits (--max-queue 4, --max-batch-size 2,
--max-streams 8, --shutdown-timeout 3): a flood is refused at once with Triton's queue-full wording and
RESOURCE_EXHAUSTED / 429 while memory stays flat (RSS of every rank measured); streams beyond the bound are
refused; a taken port fails `serve` at once with one line; SIGTERM with work longer than the timeout cuts it with
an error and exits (this last test ends the server)."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.helpers import REPO, make_tiny_llama
from tests.reliability_helpers import rss_bytes, wait_gone
from tests.serving_helpers import Server
from tests.test_serving_edge import IdleStream
from tests.test_triton_serve import ensemble_inputs, tensors
from trtllm_bdlora.errors import BdLoraError

MAX_QUEUE, MAX_BATCH, MAX_STREAMS, SHUTDOWN_TIMEOUT = 4, 2, 8, 3
MB = 1 << 20
QUEUE_FULL = "Exceeds maximum queue size"  # Triton core's wording (scheduler_utils.cc, RequestQueue::Enqueue)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("edge_limits") / "model", tokenizer=True)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # requests long enough to outlast the shutdown timeout
    (model / "config.json").write_text(json.dumps(config))
    # a non-decoupled repository (as `fill-model-repo --set decoupled_mode=false` writes it): unary calls to the
    # ensemble are answered, with their status codes, as Triton answers them for such a repository
    server = Server(model, {}, tp=2, extra=["--max-queue", str(MAX_QUEUE), "--max-batch-size", str(MAX_BATCH),
                                            "--set", "decoupled_mode=false", "--max-streams", str(MAX_STREAMS),
                                            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _rss(server) -> dict[int, int]:
    return {rank: rss_bytes(pid) for rank, pid in server.rank_pids().items()}


def _call(url, max_tokens, protocol="grpc"):
    """(outcome, seconds): "ok", or the error's status and message."""
    t0 = time.monotonic()
    if protocol == "http":
        body = {"text_input": "Hello there", "max_tokens": max_tokens}
        r = requests.post(f"http://{url}/v2/models/ensemble/generate", json=body, timeout=300)
        return ("ok" if r.status_code == 200 else (str(r.status_code), r.json()["error"])), time.monotonic() - t0
    client = grpcclient.InferenceServerClient(url)
    try:
        client.infer("ensemble", tensors(ensemble_inputs("Hello there", max_tokens)))
        return "ok", time.monotonic() - t0
    except InferenceServerException as err:
        return (str(err.status()), err.message()), time.monotonic() - t0
    finally:
        client.close()


def _flood(server, n: int, max_tokens: int, protocol: str) -> list:
    url = server.url if protocol == "grpc" else server.http_url
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: _call(url, max_tokens, protocol), range(n)))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_flood_is_refused_at_once_and_memory_stays_flat(protocol, served):
    busy = "StatusCode.RESOURCE_EXHAUSTED" if protocol == "grpc" else "429"
    _flood(served, 30, 16, protocol)  # warm-up: first-use buffers and threads
    before = _rss(served)
    results = [r for _ in range(2) for r in _flood(served, 30, 16, protocol)]
    after = _rss(served)
    refused = [(outcome, t) for outcome, t in results if outcome != "ok"]
    served_ok = len(results) - len(refused)
    assert refused and served_ok >= MAX_QUEUE + MAX_BATCH, results[:5]
    for (status, message), _ in refused:
        assert status == busy and message.startswith(QUEUE_FULL), (status, message)
    slowest = max(t for _, t in refused)
    growth = {r: round((after[r] - before[r]) / MB, 1) for r in before}
    print(f"FLOOD_{protocol.upper()} {len(results)} requests, {served_ok} served, {len(refused)} refused; slowest "
          f"refusal {slowest * 1000:.0f} ms; RSS growth over 2 floods (MiB) {json.dumps(growth)}")
    assert slowest < 2.0  # refused at once, not queued until a timeout
    assert all(abs(g) <= 16 for g in growth.values()), growth
    assert _call(served.url, 2)[0] == "ok"


def test_streams_beyond_the_bound_are_refused_and_health_still_answers(served):
    channel = grpc.insecure_channel(served.url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    streams = [IdleStream(stub) for _ in range(MAX_STREAMS)]
    try:
        time.sleep(1)
        extra = IdleStream(stub)
        extra.thread.join(10)
        assert extra.error and extra.error[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, extra.error
        assert "--max-streams" in extra.error[0].details()
        client = grpcclient.InferenceServerClient(served.url)
        t0 = time.monotonic()
        assert client.is_server_live() and client.is_server_ready()
        assert time.monotonic() - t0 < 1.0
        assert _call(served.url, 2)[0] == "ok"  # unary inference has its own capacity
    finally:
        for s in streams:
            s.close()
        channel.close()


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port", "--metrics-port", "--openai-port"])
def test_a_taken_port_fails_serve_at_once(flag, served):
    taken = {"--grpc-port": served.port, "--http-port": served.http_port,
             "--metrics-port": int(served.metrics_url.split(":")[2].split("/")[0]), "--openai-port": served.openai_port}[flag]
    ports = {"--grpc-port": 0, "--http-port": 0, "--metrics-port": 0, "--openai-port": 0}
    ports = {f: (taken if f == flag else p) for f, p in ports.items()}
    from tests.serving_helpers import free_port

    ports = {f: (p or free_port()) for f, p in ports.items()}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trtllm_bdlora", "serve", "--model", "smollm2-135m", "--tp", "2",
                           *[str(x) for kv in ports.items() for x in kv]], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    elapsed = time.monotonic() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(f"PORT_TAKEN {flag} exit {proc.returncode} after {elapsed:.1f} s: {lines}")
    assert proc.returncode != 0 and len(lines) == 1 and f"cannot listen on 127.0.0.1:{taken} ({flag})" in lines[0]
    assert elapsed < 60  # before any rank loads the model


def test_grpc_refuses_a_port_another_server_listens_on(served):
    """gRPC sets SO_REUSEPORT by default, which let a second server share a running one's port."""
    from trtllm_bdlora.serving.kserve.grpc import start_server

    with pytest.raises(BdLoraError, match=f"cannot listen on 127.0.0.1:{served.port}"):
        start_server(None, "127.0.0.1", served.port)


def test_sigterm_cuts_work_longer_than_the_timeout_and_exits(served):
    """Last: ends the server. 4 requests of 3000 tokens run (2) and wait (2); SIGTERM; after --shutdown-timeout
    they are cut with UNAVAILABLE and serve exits."""
    pids = list(served.rank_pids().values())
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(_call(served.url, 3000))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    assert not results, results  # still running
    t0 = time.monotonic()
    served.proc.send_signal(15)
    served.proc.wait(SHUTDOWN_TIMEOUT + 30)
    exited = time.monotonic() - t0
    for t in threads:
        t.join(30)
    print(f"SHUTDOWN_CUT exit {served.proc.returncode} after {exited:.1f} s (timeout {SHUTDOWN_TIMEOUT} s); "
          f"clients: {[r[0] for r in results]}")
    assert exited <= SHUTDOWN_TIMEOUT + 10
    assert len(results) == 4
    for outcome, _ in results:
        assert outcome != "ok" and outcome[0] == "StatusCode.UNAVAILABLE" and "shutting down" in outcome[1], outcome
    assert served.proc.returncode == 0, served.output()[-2000:]
    assert wait_gone(pids, 10) == []

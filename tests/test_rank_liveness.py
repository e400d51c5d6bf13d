"""A rank that stops (SIGSTOP) is found within the documented bound (`--rank-timeout` + 2 heartbeat intervals):
`serve` turns readiness off on gRPC, KServe HTTP and OpenAI, answers every pending and new request UNAVAILABLE /
503 naming the rank, and exits with a last line naming the rank and its PID; `generate` and `bench` exit naming it. A
rank resumed (SIGCONT) before the bound loses nothing: the request in flight ends with the tokens it would have."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.helpers import REPO
from tests.reliability_helpers import marked_processes, wait_gone, wait_heartbeat
from tests.serving_helpers import Server
from tests.test_triton_serve import core_inputs, tensors
from trtllm_bdlora.distributed.liveness import heartbeat_interval

RANK_TIMEOUT = 4.0
INTERVAL = heartbeat_interval(RANK_TIMEOUT)
BOUND = RANK_TIMEOUT + 2 * INTERVAL  # the documented bound
SLACK = 3.0  # scheduling on a loaded 2-core machine
PROMPT_IDS = [5, 9, 13, 17, 21]


def _greedy(client, max_tokens: int, protocol: str = "grpc") -> list[int]:
    values = core_inputs(PROMPT_IDS, max_tokens, 0, 0, exclude_input_in_output=np.array([[True]], bool))
    values.pop("end_id")
    values.pop("pad_id")
    return client.infer("tensorrt_llm", tensors(values, protocol)).as_numpy("output_ids").reshape(-1).tolist()


@pytest.fixture(scope="module")
def served(tiny_llama_with_tokenizer):
    # not decoupled, so that unary KServe calls reach tensorrt_llm (Triton refuses them on decoupled models) and
    # carry their status codes
    server = Server(tiny_llama_with_tokenizer, {}, tp=2,
                    extra=["--rank-timeout", str(RANK_TIMEOUT), "--set", "decoupled_mode=false"])
    try:
        server.wait_ready()
        ranks = server.rank_pids()
        wait_heartbeat(ranks[1])
        yield server, ranks
    finally:
        server.stop()


def test_a_worker_resumed_before_the_bound_loses_nothing(served):
    server, ranks = served
    client = grpcclient.InferenceServerClient(server.url)
    expected = _greedy(client, 60)
    result: dict = {}

    def in_flight():
        c = grpcclient.InferenceServerClient(server.url)
        try:
            result["ids"] = _greedy(c, 60)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            result["error"] = str(err)

    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(0.3)
    os.kill(ranks[1], signal.SIGSTOP)
    time.sleep(RANK_TIMEOUT - 4 * INTERVAL)  # within the guarantee (timeout - 2 intervals), with a margin
    os.kill(ranks[1], signal.SIGCONT)
    t.join(60)
    assert result == {"ids": expected}
    assert client.is_server_ready() and _greedy(client, 60) == expected
    assert "stopped responding" not in server.output()


class ReadinessProbe(threading.Thread):
    """Polls readiness on the three protocols; records when each first answered "not ready"."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.not_ready, self.done = server, {}, threading.Event()
        self.openai_health = server.openai_url.removesuffix("/v1") + "/health"

    def run(self):
        grpc_client = grpcclient.InferenceServerClient(self.server.url)
        probes = {"grpc": lambda: grpc_client.is_server_ready(),
                  "http": lambda: requests.get(f"http://{self.server.http_url}/v2/health/ready", timeout=2).status_code == 200,
                  "openai": lambda: requests.get(self.openai_health, timeout=2).status_code == 200}
        while not self.done.is_set() and len(self.not_ready) < len(probes):
            for name, ready in probes.items():
                try:
                    if name not in self.not_ready and not ready():
                        self.not_ready[name] = time.monotonic()
                except Exception:  # noqa: BLE001 - a refused connection is no "not ready" answer
                    pass
            time.sleep(0.1)


def test_a_stopped_worker_fails_readiness_and_requests_and_serve_exits_naming_it(served):
    server, ranks = served
    answers: dict = {}
    first_token = threading.Event()

    def openai_stream():  # in flight when the rank stops
        body = {"model": str(server_model(server)), "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
        with requests.post(server.openai_url + "/completions", json=body, stream=True, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        answers["openai"] = (time.monotonic(), event["error"])
                    first_token.set()

    def grpc_call():  # sent after the stop: pending
        try:
            _greedy(grpcclient.InferenceServerClient(server.url), 8)
            answers["grpc"] = (time.monotonic(), "served")
        except InferenceServerException as err:
            answers["grpc"] = (time.monotonic(), (err.status(), err.message()))

    def http_call():
        try:
            _greedy(httpclient.InferenceServerClient(server.http_url), 8, "http")
            answers["http"] = (time.monotonic(), "served")
        except InferenceServerException as err:
            answers["http"] = (time.monotonic(), (err.status(), err.message()))

    threads = [threading.Thread(target=openai_stream)]
    threads[0].start()
    assert first_token.wait(60)
    probe = ReadinessProbe(server)
    os.kill(ranks[1], signal.SIGSTOP)
    stopped = time.monotonic()
    probe.start()
    threads += [threading.Thread(target=grpc_call), threading.Thread(target=http_call)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(BOUND + SLACK + 10)
    who = "server unavailable: rank 1 stopped responding: no heartbeat for"  # clients see no PID or host
    after = {name: round(at - stopped, 2) for name, (at, _) in answers.items()}
    print(f"LIVENESS serve: pending requests answered after {after} s (bound {BOUND:g} s)")
    assert set(answers) == {"openai", "grpc", "http"}, answers
    assert all(t <= BOUND + SLACK for t in after.values()), after
    assert answers["grpc"][1][0] == "StatusCode.UNAVAILABLE" and who in answers["grpc"][1][1]
    assert answers["http"][1][0] == "503" and who in answers["http"][1][1]
    error = answers["openai"][1]
    assert error["code"] == 503 and error["type"] == "ServiceUnavailableError" and who in error["message"]
    with pytest.raises(InferenceServerException) as new:  # a new request while serve winds down
        _greedy(grpcclient.InferenceServerClient(server.url), 8)
    assert new.value.status() == "StatusCode.UNAVAILABLE" and who in new.value.message()
    probe.join(5)
    not_ready = {name: round(at - stopped, 2) for name, at in probe.not_ready.items()}
    print(f"LIVENESS serve: readiness off after {not_ready} s")
    assert set(not_ready) == {"grpc", "http", "openai"} and all(t <= BOUND + SLACK for t in not_ready.values())
    server.proc.wait(BOUND + 60)
    exited = time.monotonic() - stopped
    print(f"LIVENESS serve: exited after {exited:.1f} s with status {server.proc.returncode}")
    last = server.output().strip().splitlines()[-1]
    assert server.proc.returncode != 0
    assert last.startswith(f"trtllm-bdlora serve: error: rank 1 (pid {ranks[1]} on ") and "stopped responding" in last, last
    assert wait_gone(list(ranks.values()), 10) == []


def server_model(server) -> str:
    return requests.get(server.openai_url + "/models", timeout=10).json()["data"][0]["id"]


def _stop_rank_and_wait(args, rank: int):
    """Start a TP-2 command, SIGSTOP `rank` once both ranks send heartbeats; (status, seconds to exit, stderr, pid)."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RELIABILITY_TEST=marker)
    proc = subprocess.Popen([sys.executable, "-m", "trtllm_bdlora", *args, "--rank-timeout", str(RANK_TIMEOUT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while len(ranks := marked_processes(f"RELIABILITY_TEST={marker}")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.2)
        for pid in ranks.values():
            wait_heartbeat(pid)
        time.sleep(1.0)
        assert proc.poll() is None, "the workload ended before the stop"
        os.kill(ranks[rank], signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(BOUND + 60)
        return proc.returncode, time.monotonic() - stopped, proc.stderr.read(), ranks[rank]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in marked_processes(f"RELIABILITY_TEST={marker}").values():
            os.kill(pid, signal.SIGKILL)


def test_a_stopped_worker_ends_generate_naming_it(tiny_llama, tmp_path):
    requests_file = tmp_path / "long.jsonl"
    requests_file.write_text("".join(json.dumps({"id": i, "prompt_ids": [3, 4, i % 200], "max_tokens": 200}) + "\n"
                                     for i in range(256)))
    rc, elapsed, err, pid = _stop_rank_and_wait(
        ["generate", "--model", str(tiny_llama), "--tp", "2", "--requests", str(requests_file)], 1)
    print(f"LIVENESS generate: rank 1 stopped, exit {rc} after {elapsed:.1f} s")
    last = err.strip().splitlines()[-1]
    assert rc != 0 and last.startswith(f"trtllm-bdlora generate: error: rank 1 (pid {pid} on ") and \
        "stopped responding" in last, err[-2000:]


def test_a_stopped_rank_0_ends_bench_naming_it(tiny_llama):
    rc, elapsed, err, pid = _stop_rank_and_wait(
        ["bench", "--model", str(tiny_llama), "--tp", "2", "--steps", "5000", "--batch", "4"], 0)
    print(f"LIVENESS bench: rank 0 stopped, exit {rc} after {elapsed:.1f} s")
    last = err.strip().splitlines()[-1]
    assert rc != 0 and last.startswith(f"trtllm-bdlora bench: error: rank 1: rank 0 (pid {pid} on ") and \
        "stopped responding" in last, err[-2000:]

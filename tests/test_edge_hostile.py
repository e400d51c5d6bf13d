"""The edge under hostile clients (issue 29) and its access control (issue 24, item 3), against one running `serve`
with every edge flag set small (one flag set, one server): idle connections beyond --max-connections leave health
answering within 1 s with the file descriptors bounded; slow heads and bodies are dropped at their timeouts; a
20 MB chat message is refused before templating while health keeps answering; a non-streaming client that
disconnects is cancelled within 2 engine steps; a flood of OpenAI and KServe requests is bounded by --max-queue;
malformed text over gRPC is INVALID_ARGUMENT naming the field (the one table of bad inputs per protocol:
tests/test_bad_input_kserve.py, tests/test_bad_input_openai.py); no answer shows a host path or a Python exception name;
API keys (no key 401, wrong key 401, right key 200, health exempt) on every protocol, and CORS preflights.
The repository is the non-decoupled one (`--set decoupled_mode=false`), so that unary KServe calls reach its models
(Triton, and `serve` with it, refuses unary calls to decoupled models: tests/test_triton_serve.py)."""

import builtins
import datetime
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.helpers import make_peft_adapter, make_tiny_llama
from tests.serve_with_faults import FAULT_ADAPTER_ENV
from tests.serving_helpers import Server

pytestmark = pytest.mark.serve

KEYS = ("edge-key-one", "edge-key-two")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
GRPC_AUTH = {"authorization": f"Bearer {KEYS[0]}"}
CAP, HEADER_S, BODY_S, MAX_QUEUE, MAX_BATCH = 24, 2, 2, 4, 2
ORIGIN = "https://app.example"
FAULT_ADAPTER = 7  # sampling raises for requests on this adapter (tests/serve_with_faults.py)
SERVED_NAME = "model"  # the --model directory's name: how /v1/models lists the base model
HEALTH_RESERVE = 8
QUEUE_FULL = "Exceeds maximum queue size"


class Edge:
    def __init__(self, server: Server, root, model, adapter_root):
        self.server, self.root, self.model, self.adapter_root = server, root, model, adapter_root
        self.kserve = f"http://{server.http_url}"
        self.openai = server.openai_url.removesuffix("/v1")

    def port(self, which: str) -> int:
        return {"kserve": self.server.http_port, "openai": self.server.openai_port, "grpc": self.server.port}[which]


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    model = make_tiny_llama(root / "model", tokenizer=True)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # requests long enough to disconnect from
    (model / "config.json").write_text(json.dumps(config))
    adapter_root = root / "adapters"
    adapter = make_peft_adapter(model, adapter_root / "a1", seed=3, r=8)
    (adapter_root / "broken").mkdir()
    (adapter_root / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}')
    (root / "outside").mkdir()
    server = Server(model, {FAULT_ADAPTER: adapter}, tp=1, extra=[
        "--max-connections", str(CAP), "--request-header-timeout", str(HEADER_S),
        "--request-body-timeout", str(BODY_S), "--max-queue", str(MAX_QUEUE), "--max-batch-size", str(MAX_BATCH),
        "--api-key", KEYS[0], "--api-key", f"{KEYS[1]},spare-key", "--allowed-origins", ORIGIN,
        "--allow-adapter-loading", "--adapter-root", str(adapter_root), "--set", "decoupled_mode=false"],
        module="tests.serve_with_faults", env={FAULT_ADAPTER_ENV: str(FAULT_ADAPTER)})
    try:
        server.wait_ready()
        yield Edge(server, root, model, adapter_root)
    finally:
        server.stop()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _health_times(edge: Edge) -> list[float]:
    """Seconds each health endpoint took (no key: health is exempt); each must answer 200."""
    out = []
    for url in (f"{edge.kserve}/v2/health/ready", f"{edge.openai}/health"):
        t0 = time.monotonic()
        assert requests.get(url, timeout=5).status_code == 200, url
        out.append(time.monotonic() - t0)
    return out


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (after a 408 or nothing); False while it is still open."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_idle_connections_beyond_the_cap_leave_health_answering(edge):
    pid = edge.server.proc.pid  # at --tp 1, serve's process is rank 0
    before = _fds(pid)
    idle = [socket.create_connection(("127.0.0.1", edge.port(p))) for p in ("kserve", "openai", "grpc")
            for _ in range(4 * CAP)]
    try:
        time.sleep(0.5)
        held = _fds(pid)
        worst = max(t for _ in range(3) for t in _health_times(edge))
        print(f"EDGE_IDLE {len(idle)} idle connections: fds {before} -> {held}; worst health {worst * 1000:.1f} ms")
        assert worst < 1.0
        assert held - before <= 3 * (CAP + HEALTH_RESERVE) + 8, (before, held)
        time.sleep(HEADER_S + 1.5)  # past the request-head (gRPC: handshake) timeout
        still_open = sum(not _closed_by_server(s) for s in idle)
        assert still_open == 0, f"{still_open} idle connections outlived --request-header-timeout"
        client = grpcclient.InferenceServerClient(edge.server.url)
        assert client.is_server_live()
        client.close()
        assert _fds(pid) - before <= 8
    finally:
        for s in idle:
            s.close()


def _raw_answer(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    sock.settimeout(timeout)
    t0, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


@pytest.mark.parametrize("which,path", [("kserve", "/v2/models/ensemble/generate"), ("openai", "/v1/completions")])
def test_slow_head_and_slow_body_are_dropped_at_their_timeouts(edge, which, path):
    sock = socket.create_connection(("127.0.0.1", edge.port(which)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"text_in".encode())
    data, seconds = _raw_answer(sock, BODY_S + 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 408") and BODY_S - 0.2 < seconds < BODY_S + 2, (data[:80], seconds)
    sock = socket.create_connection(("127.0.0.1", edge.port(which)))
    t0 = time.monotonic()
    with pytest.raises(OSError):  # one byte of head every 0.5 s: the head timeout is not extended by trickling
        for _ in range(int(4 * HEADER_S / 0.5)):
            sock.sendall(b"X")
            time.sleep(0.5)
    assert time.monotonic() - t0 < HEADER_S + 2
    sock.close()


@pytest.mark.parametrize("which,path", [("kserve", "/v2/models/ensemble/infer"), ("openai", "/v1/chat/completions")])
def test_one_body_limit_refuses_before_reading(edge, which, path):
    """A declared body over --max-body-bytes (64 MiB) gets 413 from its head alone; the unread rest is dropped."""
    sock = socket.create_connection(("127.0.0.1", edge.port(which)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {64 * 1024 * 1024 + 1}\r\n\r\n{{".encode())
    data, seconds = _raw_answer(sock, 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in data and seconds < 5, (data[:200], seconds)


def test_huge_chat_message_is_refused_before_templating_while_health_answers(edge):
    body = json.dumps({"model": SERVED_NAME, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "a " * (10 * 1024 * 1024)}]})
    worst, done = [0.0], threading.Event()

    def probe():
        while not done.is_set():
            worst[0] = max(worst[0], *_health_times(edge))
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.monotonic()
    try:
        response = requests.post(f"{edge.openai}/v1/chat/completions", data=body, timeout=120,
                                 headers={**AUTH, "Content-Type": "application/json"})
    finally:
        seconds = time.monotonic() - t0
        done.set()
        prober.join()
    print(f"EDGE_CHAT_20MB answered in {seconds:.2f} s, worst health {worst[0] * 1000:.0f} ms")
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages", response.text[:300]
    assert "cannot fit the context" in error["message"] and "refused before tokenizing" in error["message"]
    assert worst[0] < 1.0 and seconds < 20


ACCESS = re.compile(r"^(\S+) INFO trtllm_bdlora\.access (.*)$")


def _access_lines(server: Server) -> list[dict]:
    out = []
    for line in server.output().splitlines():
        match = ACCESS.match(line)
        if match:
            fields = {k: json.loads(v) if v.startswith('"') else v
                      for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', match.group(2))}
            fields["time"] = datetime.datetime.fromisoformat(match.group(1).replace("Z", "+00:00")).timestamp()
            out.append(fields)
    return out


DISCONNECTS = {
    "kserve generate": ("kserve", "/v2/models/ensemble/generate",
                        {"text_input": "Hello", "max_tokens": 3000, "end_id": 1, "parameters": {"id": "gone-generate"}}),
    "kserve infer": ("kserve", "/v2/models/tensorrt_llm/infer", {"id": "gone-infer", "inputs": [
        {"name": "input_ids", "datatype": "INT32", "shape": [1, 3], "data": [5, 6, 7]},
        {"name": "input_lengths", "datatype": "INT32", "shape": [1, 1], "data": [3]},
        {"name": "request_output_len", "datatype": "INT32", "shape": [1, 1], "data": [3000]}]}),
    "openai completion": ("openai", "/v1/completions",
                          {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True}),
    "openai chat": ("openai", "/v1/chat/completions", {"model": SERVED_NAME, "max_tokens": 3000, "ignore_eos": True,
                                                        "messages": [{"role": "user", "content": "Hello"}]}),
    "openai stream": ("openai", "/v1/completions",
                      {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}),
}


@pytest.mark.parametrize("case", list(DISCONNECTS))
def test_a_client_that_disconnects_is_cancelled_within_two_steps(edge, case):
    which, path, body = DISCONNECTS[case]
    data = json.dumps(body).encode()
    seen = len(_access_lines(edge.server))
    sock = socket.create_connection(("127.0.0.1", edge.port(which)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    time.sleep(1.5)  # running by now, far from its 3000 tokens
    gone = time.time()
    sock.close()
    deadline, lines = time.monotonic() + 20, []
    while time.monotonic() < deadline and not lines:
        lines = _access_lines(edge.server)[seen:]
        time.sleep(0.05)
    assert len(lines) == 1, lines
    line = lines[0]
    tokens, compute_ms = int(line["tokens_out"]), float(line["compute_ms"])
    step_s = compute_ms / 1000 / max(tokens, 1)
    latency = line["time"] - gone
    print(f"EDGE_CANCEL {case}: cancelled {latency * 1000:.0f} ms after the disconnect, after {tokens} tokens "
          f"(engine step {step_s * 1000:.1f} ms)")
    assert line["outcome"] == "cancelled" and 0 < tokens < 3000, line
    assert latency <= 2 * step_s + 0.25, (latency, step_s)  # 2 steps, plus the log line's millisecond stamp and wake-up


def test_a_flood_is_bounded_by_max_queue_on_openai_and_kserve_alike(edge):
    start = threading.Barrier(32)

    def one(i: int):
        start.wait()
        t0 = time.monotonic()
        if i % 2:
            r = requests.post(f"{edge.openai}/v1/completions", headers=AUTH, timeout=300, json={
                "model": SERVED_NAME, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True})
            message = r.json()["error"]["message"] if r.status_code != 200 else ""
        else:
            r = requests.post(f"{edge.kserve}/v2/models/ensemble/generate", headers=AUTH, timeout=300,
                              json={"text_input": "Hello", "max_tokens": 200, "end_id": 1})
            message = r.json()["error"] if r.status_code != 200 else ""
        return r.status_code, message, time.monotonic() - t0

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    print(f"EDGE_FLOOD 32 requests (16 OpenAI, 16 KServe), --max-queue {MAX_QUEUE} --max-batch-size {MAX_BATCH}: "
          f"{len(served)} served, {len(refused)} refused, slowest refusal {max(r[2] for r in refused):.2f} s")
    assert 1 <= len(served) <= MAX_QUEUE + MAX_BATCH
    assert all(status == 429 and message.startswith(QUEUE_FULL) for status, message, _ in refused), refused
    assert max(r[2] for r in refused) < 5


def test_malformed_text_over_grpc_is_invalid_argument(edge):
    client = grpcclient.InferenceServerClient(edge.server.url)
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"a\x00b"]], dtype=object))
    tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[2]], np.int32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", [text, tokens], headers=GRPC_AUTH)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "text_input" in info.value.message()
    client.close()


PYTHON_EXCEPTIONS = {name for name, value in vars(builtins).items()
                     if isinstance(value, type) and issubclass(value, BaseException)} | {
    "Traceback", "RankLostError", "JSONDecodeError", "ValidationError", "TemplateError"}


def test_no_answer_shows_a_host_path_or_an_exception_name(edge):
    bodies = []

    def post(base, path, doc):
        bodies.append(requests.post(base + path, json=doc, headers=AUTH, timeout=60).text)

    post(edge.openai, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "broken"})  # 400: its file's problem
    post(edge.openai, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(edge.root / "outside")})  # 403
    post(edge.openai, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "missing"})  # 404
    post(edge.openai, "/v1/load_lora_adapter", {"lora_name": "loaded", "lora_path": str(edge.adapter_root / "a1")})
    for path in ("/v1/models", "/v1/models/loaded"):
        bodies.append(requests.get(edge.openai + path, headers=AUTH, timeout=10).text)
    for model in ("tensorrt_llm", "preprocessing", "ensemble"):
        for what in ("config", ""):
            bodies.append(requests.get(f"{edge.kserve}/v2/models/{model}/{what}".rstrip("/"), headers=AUTH, timeout=10).text)
    # internal errors: sampling raises for FAULT_ADAPTER (the test entry point's fault)
    post(edge.openai, "/v1/completions", {"model": str(FAULT_ADAPTER), "prompt": "Hello", "max_tokens": 4})
    post(edge.kserve, "/v2/models/ensemble/generate", {"text_input": "Hello", "max_tokens": 4, "lora_task_id": FAULT_ADAPTER})
    client = grpcclient.InferenceServerClient(edge.server.url)
    values = {"text_input": np.array([[b"Hello"]], dtype=object), "max_tokens": np.array([[4]], np.int32),
              "lora_task_id": np.array([[FAULT_ADAPTER]], np.uint64)}
    inputs = []
    for name, array in values.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), {"O": "BYTES", "i": "INT32", "u": "UINT64"}[array.dtype.kind]))
        inputs[-1].set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", inputs, headers=GRPC_AUTH)
    bodies.append(info.value.message())
    client.close()
    assert "internal error" in bodies[-1] and "internal error" in bodies[-2] and "internal error" in bodies[-3]
    hidden = {str(edge.root), str(edge.root.resolve()), str(edge.adapter_root), str(edge.model)}
    for body in bodies:
        assert not any(path in body for path in hidden), body[:500]
        names = set(re.findall(r"[A-Za-z_]\w*", body)) & PYTHON_EXCEPTIONS
        assert not names, (names, body[:500])
    alias = requests.post(f"{edge.openai}/v1/completions", headers=AUTH, timeout=60,  # the path still names the base
                          json={"model": str(edge.model), "prompt": "Hello", "max_tokens": 2})
    assert alias.status_code == 200, alias.text
    log = edge.server.output()  # the server's log keeps what clients do not see
    assert "RuntimeError: injected fault" in log and str(edge.adapter_root) in log


def test_api_keys_on_every_protocol_health_exempt(edge):
    generate = {"text_input": "Hello", "max_tokens": 2}
    completion = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 2}
    cases = [("POST", f"{edge.kserve}/v2/models/ensemble/generate", generate),
             ("GET", f"{edge.kserve}/v2/models/ensemble/config", None),
             ("POST", f"{edge.openai}/v1/completions", completion), ("GET", f"{edge.openai}/v1/models", None),
             ("POST", f"{edge.openai}/v1/load_lora_adapter", {"lora_name": "k", "lora_path": "a1"})]
    for method, url, doc in cases:
        for headers, want in (({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": KEYS[0]}, 401),
                              ({"Authorization": f"Bearer {KEYS[0]}"}, 200), ({"Authorization": "bearer spare-key"}, 200)):
            if want == 200 and "load_lora" in url:
                doc = {**doc, "lora_name": f"k{headers['Authorization'][-3:]}"}
            response = requests.request(method, url, json=doc, headers=headers, timeout=60)
            assert response.status_code == want, (url, headers, response.status_code, response.text[:200])
            if want == 401:
                assert response.headers.get("www-authenticate") == "Bearer" and "API key" in response.text
    for url in (f"{edge.kserve}/v2/health/live", f"{edge.kserve}/v2/health/ready", f"{edge.kserve}/v2/models/ensemble/ready",
                f"{edge.openai}/health", edge.server.metrics_url):
        assert requests.get(url, timeout=10).status_code == 200, url
    client = grpcclient.InferenceServerClient(edge.server.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("ensemble")  # exempt
    for headers in (None, {"authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("ensemble", headers=headers)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert client.get_model_metadata("ensemble", headers=GRPC_AUTH).name == "ensemble"
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"Hello"]], dtype=object))
    tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[2]], np.int32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", [text, tokens])
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert client.infer("ensemble", [text, tokens], headers=GRPC_AUTH).as_numpy("text_output") is not None
    client.close()
    channel = grpc.insecure_channel(edge.server.url)  # a stream without the key is refused too
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    with pytest.raises(grpc.RpcError) as stream_error:
        next(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([pb.ModelInferRequest(model_name="ensemble")])))
    assert stream_error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_cors_preflight_and_headers(edge):
    for base, path in ((edge.openai, "/v1/chat/completions"), (edge.kserve, "/v2/models/ensemble/generate")):
        allowed = requests.options(base + path, timeout=10, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other = requests.options(base + path, timeout=10, headers={"Origin": "https://evil.example",
                                                                   "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    refused = requests.get(f"{edge.openai}/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN  # readable by the page

"""The edge's pieces in process (serving/edge/): JSON and text checks, API keys, the ASGI layers (body limit, keys,
CORS, the shield) on a small app, repeated-event logging, settings and the descriptor budget, errors without
exception names or host paths, and the connection guard's admission order."""

import hashlib
import json
import logging
import resource

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from trtllm_bdlora.errors import BdLoraError, InputError, as_error, hide_path, log_text, public_text
from trtllm_bdlora.serving.edge.asgi import edge_app
from trtllm_bdlora.serving.edge.auth import ApiKeys
from trtllm_bdlora.serving.edge.events import EventLog, RepeatFilter
from trtllm_bdlora.serving.edge.listener import ConnectionGuard, HealthOnly, Limits
from trtllm_bdlora.serving.edge.payload import MAX_JSON_DEPTH, check_document, parse_json, text_problem
from trtllm_bdlora.serving.edge.settings import (
    EdgeSettings,
    connection_cap,
    descriptors_needed,
    split_keys,
    split_origins,
)
from trtllm_bdlora.serving.openai.names import check_name

pytestmark = pytest.mark.unit


def test_json_depth_and_text_are_checked_naming_the_field():
    assert parse_json(b'{"a": [1, {"b": "ok"}]}') == {"a": [1, {"b": "ok"}]}
    for body, field in ((b"[" * 100_000 + b"]" * 100_000, "nested deeper"),  # RecursionError inside json
                        (json.dumps([[[]]]).replace("[]", "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode(),
                         "nested deeper than 64"),
                        (b'{"messages": [{"content": "x\\ud800"}]}', "messages[0].content"),
                        (b'{"lora_path": "a\\u0000"}', "lora_path"),
                        (b'{"a\\udc00": 1}', "a key of the request body"),
                        (b'{"a": ', "not valid JSON")):
        with pytest.raises(BdLoraError) as info:
            parse_json(body)
        assert field in str(info.value) and info.value.status.http == 400, (body[:40], str(info.value))
    check_document([[1]] * 3, max_depth=2)
    with pytest.raises(InputError):
        check_document([[[1]]], max_depth=2)
    assert text_problem("caf\u00e9 \U0001f600") is None and "character 3" in text_problem("abc\ud83d")


def test_api_keys_compare_every_key_in_constant_time():
    keys = ApiKeys(["alpha", "beta"])
    assert keys.refusal("Bearer beta") is None and keys.refusal("bearer alpha") is None
    for header in (None, "", "beta", "Basic beta", "Bearer ", "Bearer gamma", "Bearer alph", "Bearer \ud800"):
        error = keys.refusal(header)
        assert error is not None and error.status.http == 401 and error.status.grpc == "UNAUTHENTICATED"
    assert keys.digests == [hashlib.sha256(b"alpha").digest(), hashlib.sha256(b"beta").digest()]
    assert not ApiKeys([]) and split_keys(None, {"API_KEY": "a, b,,c"}) == ("a", "b", "c")
    assert split_keys(["x"], {"API_KEY": "a"}) == ("x",) and split_keys(None, {}) == ()
    assert split_origins(['["https://a.example", "http://b:8080"]', "https://c.example,*"]) == (
        "https://a.example", "http://b:8080", "https://c.example", "*")


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    @app.get("/boom")
    async def boom():
        raise KeyError("/secret/path/slot table")

    return app


def test_edge_layers_body_limit_keys_cors_and_shield():
    settings = EdgeSettings(max_body_bytes=100, api_keys=("k1",), allowed_origins=("https://app.example",))
    client = TestClient(edge_app(_app(), settings, lambda path: path == "/health", lambda err: {"error": str(err)}),
                        raise_server_exceptions=False)
    assert client.get("/health").status_code == 200  # exempt
    assert client.post("/echo", content=b"x" * 10).status_code == 401
    auth = {"Authorization": "Bearer k1"}
    assert client.post("/echo", content=b"x" * 100, headers=auth).json() == {"bytes": 100}
    over = client.post("/echo", content=b"x" * 101, headers=auth)
    assert over.status_code == 413 and "--max-body-bytes" in over.json()["error"]
    streamed = client.post("/echo", content=iter([b"x" * 60, b"x" * 60]), headers=auth)  # chunked: no Content-Length
    assert streamed.status_code == 413
    boom = client.get("/boom", headers=auth)
    assert boom.status_code == 500 and "KeyError" not in boom.text and "/secret" not in boom.text
    preflight = client.options("/echo", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"


def test_repeated_events_are_logged_once_per_interval(caplog):
    now = [0.0]
    events = EventLog(logging.getLogger("test.edge.events"), interval=30, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.edge.events"):
        for second in range(100):
            now[0] = second * 0.5  # 100 refusals in 50 s
            events.note("refuse", "refused a connection")
    lines = [r.getMessage() for r in caplog.records if r.name == "test.edge.events"]
    assert lines == ["refused a connection", "refused a connection (60 times in the last 30 s)"]
    flt = RepeatFilter(interval=30, clock=lambda: now[0])
    records = [logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, "Invalid HTTP request received.", None,
                                 None) for _ in range(1000)]
    passed = []
    for i, record in enumerate(records):
        now[0] = i * 0.05
        if flt.filter(record):
            passed.append(record.getMessage())
    assert passed == ["Invalid HTTP request received.",
                      "Invalid HTTP request received. (599 more like this in the last 30 s, not shown)"]


def test_settings_are_checked_and_the_cap_fits_the_descriptor_limit():
    for bad in (dict(max_connections=0), dict(header_timeout=0), dict(body_timeout=-1), dict(max_body_bytes=0),
                dict(api_keys=("has space",)), dict(allowed_origins=("app.example",)), dict(grpc_max_connection_idle=-1)):
        with pytest.raises(BdLoraError):
            EdgeSettings(**bad)

    from trtllm_bdlora.cli import parse_config

    edge = parse_config(["serve", "--max-connections", "50", "--request-header-timeout", "3"])[1].edge
    assert edge.max_connections == 50 and edge.header_timeout == 3.0
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10) == 10
    if hard != resource.RLIM_INFINITY:
        assert descriptors_needed(connection_cap(None)) <= hard
        too_many = hard  # needs three times as many descriptors as the hard limit
        with pytest.raises(BdLoraError) as info:
            connection_cap(too_many)
        assert "--max-connections" in str(info.value) and "ulimit -n" in str(info.value)


def test_client_errors_carry_no_exception_names_or_host_paths():
    err = as_error(FileNotFoundError(2, "No such file", "/opt/models/secret/x.bin"), "internal error while loading")
    assert str(err) == "internal error while loading" and err.status.http == 500
    assert log_text(err).startswith("internal error while loading: FileNotFoundError:") and "/opt/models" in log_text(err)
    hide_path("/srv/edge-units/adapters", "<--adapter-root>")
    assert public_text("/srv/edge-units/adapters/x/adapter_config.json: missing") == \
        "<--adapter-root>/x/adapter_config.json: missing"
    for bad in ("", "\ud800", "a\x00", "a\nb", " padded", "x" * 257):
        with pytest.raises(InputError):
            check_name("lora_name", bad)
    assert check_name("lora_name", "my-adapter.v2") == "my-adapter.v2"


class FakeConnection:
    def __init__(self):
        self.evicted = False

    def evict(self):
        self.evicted = True


def test_guard_replaces_the_longest_idle_then_reserves_health_then_refuses():
    guard = ConnectionGuard("test", Limits(2, 1, 10, 10, 100), lambda path: path == "/health")
    a, b, c, d, e = (FakeConnection() for _ in range(5))
    assert guard.admit(a) == guard.admit(b) == "normal"
    guard.busy(a)
    assert guard.admit(c) == "normal" and b.evicted and not a.evicted  # b idled the longest
    guard.busy(c)
    assert guard.admit(d) == "reserve"  # everything busy: health only
    guard.busy(d)
    assert guard.admit(e) is None  # reserve busy too
    guard.rest(a)
    assert guard.admit(e) == "normal" and a.evicted and guard.open == 3


def test_reserve_connections_answer_health_only():
    client = TestClient(HealthOnly(_app(), lambda path: path == "/health"))
    assert client.get("/health").json() == {"ok": True}
    busy = client.post("/echo", content=b"x")
    assert busy.status_code == 503 and "--max-connections" in busy.text and busy.headers["retry-after"] == "1"

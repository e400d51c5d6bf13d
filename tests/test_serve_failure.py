"""Shutdown and rank failure of `serve --tp 2`: no hang, no orphans, clear exit codes."""

import os
import signal
import threading
import time

import pytest
import tritonclient.grpc as grpcclient

from tests.helpers import make_peft_adapter, make_tiny_llama
from tests.serving_helpers import Server
from trtllm_bdlora.cli.client import infer


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail")
    model = make_tiny_llama(root / "model", tokenizer=True)
    return model, make_peft_adapter(model, root / "a1", seed=5, r=16)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_killing_a_worker_fails_pending_requests_and_exits(model_and_adapter):
    model, adapter = model_and_adapter
    server = Server(model, {1: adapter})
    server.wait_ready()
    ranks = server.rank_pids()
    assert set(ranks) == {0, 1}, ranks
    errors = []

    def long_request():
        c = grpcclient.InferenceServerClient(server.url)
        try:
            infer(c, "Hello there", 200, 1)
        except Exception as err:  # noqa: BLE001 - the failure is the expected outcome
            errors.append(str(err))
        finally:
            c.close()

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    os.kill(ranks[1], signal.SIGKILL)
    start = time.time()
    try:
        server.proc.wait(30)
    except Exception:
        pytest.fail(f"server still running 30 s after a rank died: {server.output()[-2000:]}")
    elapsed = time.time() - start
    t.join(30)
    assert server.proc.returncode != 0 and elapsed < 30
    assert errors, "the in-flight request should have failed"
    assert all(not _alive(pid) for pid in ranks.values())
    server.stop()


def test_sigterm_finishes_in_flight_requests(model_and_adapter):
    model, adapter = model_and_adapter
    server = Server(model, {1: adapter})
    server.wait_ready()
    ranks = server.rank_pids()
    result = {}

    def request():
        c = grpcclient.InferenceServerClient(server.url)
        try:
            result["text"] = infer(c, "Hello there", 60, 1)
        except Exception as err:  # noqa: BLE001
            result["error"] = str(err)
        finally:
            c.close()

    t = threading.Thread(target=request)
    t.start()
    time.sleep(0.5)
    assert server.stop() == 0, server.output()[-2000:]
    t.join(30)
    assert "text" in result and result["text"], result
    assert "stopped" in server.output()
    assert all(not _alive(pid) for pid in ranks.values())

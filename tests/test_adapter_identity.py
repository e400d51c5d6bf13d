"""One adapter identity across front ends, against one `serve --tp 2 --allow-adapter-loading --adapter-root DIR`
with a start-up adapter: an id means the weights of its first registration until it is unloaded, whichever front
end registered it or sends weights for it; each cross-front-end re-registration is refused in one line naming the
id, with an access-log line, and the original weights keep serving (greedy tokens equal to before). An id being
unloaded cannot come back while requests that named it are pending. Through the same server's load: a symlink
swapped during 60 loads never serves a file outside the root, and a 10 GB sparse adapter is refused with every
rank's peak RSS up under 100 MB."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.adapter_file_helpers import (
    GIB,
    ReadWatch,
    SymlinkSwapper,
    huge_tensor_header,
    sized_header,
    write_sparse_safetensors,
)
from tests.helpers import make_peft_adapter
from tests.serving_helpers import Server, post_json
from tests.test_triton_serve import core_inputs, tensors
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.trtllm_format import convert_adapter

PROMPT_IDS = [7, 11, 13, 17, 19]


@pytest.fixture(scope="module")
def served(tiny_llama_with_tokenizer, tmp_path_factory):
    work = tmp_path_factory.mktemp("identity")
    model = tiny_llama_with_tokenizer
    root = work / "adapters"
    dirs = {name: make_peft_adapter(model, root / name, seed=seed, r=8) for name, seed in (("a", 71), ("b", 72))}
    dirs["startup"] = make_peft_adapter(model, work / "startup", seed=73, r=8)
    dirs["outside"] = make_peft_adapter(model, work / "outside", seed=74, r=8)
    weights = {name: convert_adapter(load_peft_adapter(d), 2, "float32") for name, d in dirs.items()}
    # unary calls to tensorrt_llm, as Triton allows them only to a repository written with decoupled_mode=false;
    # lora_weights as FP32, as the requests below send them (Triton refuses another dtype than the config's)
    server = Server(model, {1: dirs["startup"]}, tp=2, extra=["--allow-adapter-loading", "--adapter-root", str(root),
                                                              "--set", "decoupled_mode=false",
                                                              "--set", "lora_weights_data_type=TYPE_FP32"])
    try:
        server.wait_ready()
        yield server, root, dirs, weights
    finally:
        assert server.stop() == 0, server.output()[-3000:]


def _ids(server, task_id=None, lora=None, protocol="grpc", max_tokens=8) -> list[int]:
    values = core_inputs(PROMPT_IDS, max_tokens, 0, 0, exclude_input_in_output=np.array([[True]], bool))
    values.pop("end_id")
    values.pop("pad_id")
    if task_id is not None:
        values["lora_task_id"] = np.array([[task_id]], np.uint64)
    if lora is not None:
        values["lora_weights"], values["lora_config"] = lora[0].astype(np.float32), lora[1].astype(np.int32)
    client = (grpcclient.InferenceServerClient(server.url) if protocol == "grpc"
              else httpclient.InferenceServerClient(server.http_url))
    return client.infer("tensorrt_llm", tensors(values, protocol)).as_numpy("output_ids").reshape(-1).tolist()


def _refused(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def _access(server, *fragments: str) -> list[str]:
    """Access-log lines of the server that contain every fragment."""
    return [line for line in server.output().splitlines()
            if "trtllm_bdlora.access" in line and all(f in line for f in fragments)]


def _wait_access(server, *fragments: str, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while not (lines := _access(server, *fragments)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return lines


def test_a_an_id_loaded_through_openai_refuses_other_weights_on_kserve(served):
    server, _, _, weights = served
    status, body = post_json(server, "/v1/load_lora_adapter", {"lora_name": "10", "lora_path": "a"})
    assert status == 200, body
    before = _ids(server, 10)
    assert _ids(server, 10, weights["a"]) == before  # its own weights (as convert-adapter writes them) are fine
    assert _ids(server, 11, weights["b"]) != before  # the other adapter would answer differently
    for protocol, code in (("grpc", "StatusCode.INVALID_ARGUMENT"), ("http", "400")):
        status, message = _refused(lambda p=protocol: _ids(server, 10, weights["b"], p))
        assert status == code and "lora_task_id 10 is registered" in message and "\n" not in message, message
    assert _ids(server, 10) == before
    assert len(_wait_access(server, "adapter=10", "outcome=rejected", "lora_task_id 10 is registered")) == 2


def _stream_tokens(server, model: str, max_tokens: int, started: threading.Event, out: list) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "return_token_ids": True}
    with requests.post(server.openai_url + "/completions", json=body, stream=True, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                out += event["choices"][0].get("token_ids") or []
                started.set()


LONG = 200  # tokens of the pending request: it must outlast the unload, the refused load and the refused gRPC call


def test_b_an_id_registered_over_grpc_cannot_return_with_other_weights_while_named_by_pending_requests(served):
    server, _, _, weights = served
    _ids(server, 20, weights["a"])  # registered over gRPC
    want = requests.post(server.openai_url + "/completions", timeout=120, json={
        "model": "20", "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0,
        "return_token_ids": True}).json()["choices"][0]["token_ids"]
    started, got = threading.Event(), []
    pending = threading.Thread(target=_stream_tokens, args=(server, "20", LONG, started, got))
    pending.start()
    assert started.wait(60)
    status, body = post_json(server, "/v1/unload_lora_adapter", {"lora_name": "20"})
    assert status == 200, body
    status, body = post_json(server, "/v1/load_lora_adapter", {"lora_name": "20", "lora_path": "b"})
    assert status == 400 and "lora_task_id 20) is being unloaded" in body["error"]["message"], body
    status, message = _refused(lambda: _ids(server, 20, weights["b"]))
    assert status == "StatusCode.NOT_FOUND" and "lora_task_id 20" in message and "being unloaded" in message
    pending.join(120)
    assert got == want  # the pending request kept the weights it named
    deadline = time.monotonic() + 30  # the unload completes at the step that ends the last request naming it
    while (status := post_json(server, "/v1/load_lora_adapter", {"lora_name": "20", "lora_path": "b"})[0]) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    status, message = _refused(lambda: _ids(server, 20, weights["a"]))  # 20 means b now: a's weights are refused
    assert status == "StatusCode.INVALID_ARGUMENT" and "lora_task_id 20 is registered" in message, message
    assert _ids(server, 20) == _ids(server, 11, weights["b"])
    assert _access(server, "op=load_lora_adapter", "name=20", "adapter=20", "outcome=rejected", "being unloaded")
    assert _access(server, "op=unload_lora_adapter", "name=20", "outcome=unloaded")
    assert _wait_access(server, "adapter=20", "outcome=rejected", "lora_task_id 20 is registered")


def test_c_a_startup_id_cannot_be_unloaded_or_replaced(served):
    server, _, _, weights = served
    before = _ids(server, 1)
    status, body = post_json(server, "/v1/unload_lora_adapter", {"lora_name": "1"})
    assert status == 403 and body["error"]["type"] == "PermissionDeniedError", body
    assert "lora_task_id 1" in body["error"]["message"] and "--allow-startup-adapter-unload" in body["error"]["message"]
    status, body = post_json(server, "/v1/load_lora_adapter", {"lora_name": "1", "lora_path": "b"})
    assert status == 400 and "already been loaded" in body["error"]["message"], body
    status, message = _refused(lambda: _ids(server, 1, weights["b"]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "lora_task_id 1 is registered at start-up" in message
    assert _ids(server, 1) == before
    assert _access(server, "op=unload_lora_adapter", "name=1", "adapter=1", "outcome=rejected", "--allow-startup")
    assert _access(server, "op=load_lora_adapter", "name=1", "outcome=rejected", "already been loaded")
    assert _wait_access(server, "adapter=1", "outcome=rejected", "registered at start-up")


def _rank_peak_rss(pids: dict[int, int], call) -> dict[int, int]:
    """Each rank's peak RSS growth (bytes) during `call` (its high-water mark, reset first)."""
    def hwm(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024

    for pid in pids.values():
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = {r: hwm(pid) for r, pid in pids.items()}
    call()
    return {r: hwm(pid) - before[r] for r, pid in pids.items()}


def test_a_10_gb_sparse_adapter_is_refused_with_memory_flat(served):
    server, root, dirs, _ = served
    huge = root / "huge"
    huge.mkdir()
    (huge / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    size = 10 * GIB
    write_sparse_safetensors(huge / "adapter_model.safetensors", sized_header(huge_tensor_header(size, 8), size), size)
    answer = {}
    growth = _rank_peak_rss(server.rank_pids(), lambda: answer.update(
        zip(("status", "body"), post_json(server, "/v1/load_lora_adapter", {"lora_name": "huge", "lora_path": "huge"}))))
    print(f"SPARSE serve: peak RSS growth per rank {[round(g / 2**20, 1) for g in growth.values()]} MiB, "
          f"{answer['status']}: {answer['body']['error']['message']}")
    assert answer["status"] == 400 and "refused before reading" in answer["body"]["error"]["message"]
    assert all(g < 100 * 2**20 for g in growth.values()), growth
    assert _access(server, "op=load_lora_adapter", "name=huge", "outcome=rejected", "refused before reading")


def test_a_symlink_swapped_during_60_loads_never_serves_a_file_outside_the_root(served):
    """The weights file of an adapter directory in the root is a symlink swapped between an adapter inside the
    root and one outside it. Every load is refused (403) or registers the inside adapter (its own weights are
    accepted for the id, the outside adapter's refused); no outside file is ever read."""
    server, root, dirs, weights = served
    filed = root / "filed"
    filed.mkdir()
    (filed / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    outside_file = dirs["outside"] / "adapter_model.safetensors"
    watch = ReadWatch([dirs["outside"], outside_file])
    swapper = SymlinkSwapper(filed / "adapter_model.safetensors", "../a/adapter_model.safetensors", str(outside_file))
    outcomes = {200: 0, 403: 0}
    try:
        watch.events()
        for i in range(60):
            status, body = post_json(server, "/v1/load_lora_adapter", {"lora_name": f"race{i}", "lora_path": "filed"})
            assert status in outcomes, body
            outcomes[status] += 1
            if status == 200:
                task_id = next(c["lora_task_id"] for c in requests.get(server.openai_url + "/models", timeout=30).json()[
                    "data"] if c["id"] == f"race{i}")
                status, message = _refused(lambda t=task_id: _ids(server, t, weights["outside"], max_tokens=1))
                assert status == "StatusCode.INVALID_ARGUMENT", message
                assert post_json(server, "/v1/unload_lora_adapter", {"lora_name": f"race{i}"})[0] == 200
    finally:
        swapper.close()
    reads = [e for e in watch.events() if e[1] == "read"]
    watch.close()
    print(f"ADAPTER_ROOT_RACE serve: {outcomes[200]} loaded the inside adapter, {outcomes[403]} refused, "
          f"{len(reads)} reads of the outside adapter")
    assert reads == [] and outcomes[403] > 0 and outcomes[200] + outcomes[403] == 60


def test_startup_unload_flag_frees_the_id(tiny_llama, bd_adapters, tmp_path):
    """--allow-startup-adapter-unload (in process, TP 1): an --adapter id can then be unloaded, and only then
    registered again, with other weights; without it the unload is refused naming the flag."""
    from trtllm_bdlora.cli import parse_config
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine
    from trtllm_bdlora.engine.runtime import Runtime
    from trtllm_bdlora.errors import PermissionDeniedError, RequestError

    loading = ["serve", "--allow-adapter-loading", "--adapter-root", str(tmp_path)]
    assert parse_config([*loading, "--allow-startup-adapter-unload"])[1].server.allow_startup_adapter_unload
    assert not parse_config(loading)[1].server.allow_startup_adapter_unload
    other = load_peft_adapter(bd_adapters[1])
    for allowed in (False, True):
        engine = Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(bd_adapters[0]))], max_loras=2)
        runtime = Runtime(engine, allow_startup_unload=allowed).start()
        try:
            with pytest.raises(RequestError, match="lora_task_id 1 is already registered"):
                runtime.register_adapter(1, other)
            if not allowed:
                with pytest.raises(PermissionDeniedError, match="--allow-startup-adapter-unload"):
                    runtime.unregister_adapter(1)
                assert engine.registry.source(1) == "--adapter"
                continue
            runtime.unregister_adapter(1)
            assert 1 not in engine.pool and engine.registry.source(1) is None
            runtime.register_adapter(1, other)
            assert engine.registry.source(1) == "load"
        finally:
            runtime.stop(30)

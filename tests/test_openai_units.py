"""In-process checks of the OpenAI layer's parts: adapter names and `--adapter NAME:ID=DIR`, the adapter-root
confinement, stop strings and stream pieces, the adapter wire format, run-time (un)registration in the runtime, and
which cause it reports when a rank is lost."""

import argparse
import threading
import time

import pytest
import torch

from tests.helpers import make_request
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.lora import adapter_from_wire, adapter_to_wire
from trtllm_bdlora.cli import parse_adapter_arg
from trtllm_bdlora.distributed.comm import Comm, RankLostError
from trtllm_bdlora.distributed.liveness import RankLost
from trtllm_bdlora.engine.adapter_pool import shards_nbytes
from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.engine.runtime import Runtime, Submission
from trtllm_bdlora.errors import BdLoraError, RequestError
from trtllm_bdlora.serving.openai.names import AdapterNames, adapter_root
from trtllm_bdlora.serving.openai.protocol import TextTracker, stream_piece


def test_adapter_arg_forms():
    plain, named = parse_adapter_arg("3=/a/b=c"), parse_adapter_arg("org:tuned:4=/d")
    assert (plain.task_id, plain.directory, plain.openai_name) == (3, "/a/b=c", "3")
    assert (named.task_id, named.directory, named.openai_name) == (4, "/d", "org:tuned")
    for bad in ("x=/d", "0=/d", ":1=/d", "2:1=/d", "1=", "1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_adapter_arg(bad)


def test_names_resolve_list_and_refuse():
    names = AdapterNames("base", "/m", [parse_adapter_arg("1=/a"), parse_adapter_arg("alpha:2=/b")])
    registered = {1, 2, 7}  # 7: registered over gRPC, answers to "7"
    assert [names.resolve(m, registered) for m in (None, "", "base", "1", "alpha", "2", "7")] == [None] * 3 + [1, 2, 2, 7]
    for unknown in ("beta", "8", "07", "-1"):
        with pytest.raises(BdLoraError) as info:
            names.resolve(unknown, registered)
        assert info.value.status.http == 404
    cards = names.cards(registered, 256)
    assert [(c["id"], c.get("lora_task_id"), c["root"]) for c in cards] == [
        ("base", None, "/m"), ("1", 1, "a"), ("alpha", 2, "b"), ("7", 7, None)]  # adapters: directory names, no paths
    assert names.next_id(registered) == 8 and names.taken("alpha", registered) and names.taken("7", registered)
    names.forget(2)
    with pytest.raises(BdLoraError):
        names.resolve("alpha", {1, 7})
    for bad in (["base:1=/a"], ["x:1=/a", "x:2=/b"]):
        with pytest.raises(BdLoraError):
            AdapterNames("base", "/m", [parse_adapter_arg(a) for a in bad])


def test_adapter_root_confinement(tmp_path):
    """Directories and files are opened beneath the root and checked by descriptor: a symlink leaving the root is
    refused (403) where it is met, the directory or the file; a missing directory is a 404."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "adapter_config.json").write_text("{}")
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_bytes(b"")
    (root / "link").symlink_to(outside)
    (root / "inside_link").symlink_to(root / "ok")  # a symlink within the root is followed
    (root / "mixed").mkdir()
    (root / "mixed" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    opened = adapter_root(str(root), True)
    for path in ("ok", str(root / "ok"), "inside_link"):
        with opened.open_adapter(path) as directory:
            assert directory.read_small("adapter_config.json", 100) == b"{}"
    for path in (str(outside), "link", "../outside", "ok/../../outside"):
        with pytest.raises(BdLoraError) as info:
            opened.open_adapter(path)
        assert info.value.status.http == 403, path
    with opened.open_adapter("mixed") as directory, pytest.raises(BdLoraError) as info:
        directory.open_file("adapter_model.safetensors")
    assert info.value.status.http == 403 and "outside --adapter-root" in str(info.value)
    with pytest.raises(BdLoraError) as info:
        opened.open_adapter("missing")
    assert info.value.status.http == 404
    assert adapter_root(None, False) is None
    with pytest.raises(BdLoraError):
        adapter_root(None, True)


def test_stop_strings_and_stream_pieces():
    pieces = ["He", "llo", " wor", "ld", "!"]
    tracker = TextTracker(lambda ids: "".join(pieces[i] for i in ids), ["o w", "ld!"])
    assert [tracker.add(i) for i in range(3)] == [False, False, True]
    assert (tracker.text, tracker.stop_reason, tracker.holdback) == ("Hell", "o w", 2)
    # a stream sends nothing that could still turn into a stop string, nor half a UTF-8 character
    assert stream_piece("Hello", 0, 2, final=False) == ("Hel", 3)
    assert stream_piece("Hello\ufffd", 3, 0, final=False) == ("lo", 5)
    assert stream_piece("Hell", 3, 2, final=True) == ("l", 4)
    assert stream_piece("Hi", 2, 2, final=False) == ("", 2)


def test_adapter_wire_round_trip(bd_adapters, lora_adapter):
    for directory in (bd_adapters[0], lora_adapter):
        adapter = load_peft_adapter(directory)
        meta, flat = adapter_to_wire(adapter)
        back = adapter_from_wire(meta, flat.clone())
        assert (back.kind, back.rank, back.nblocks, back.path) == (adapter.kind, adapter.rank, adapter.nblocks, adapter.path)
        assert back.modules.keys() == adapter.modules.keys()
        for key, f in adapter.modules.items():
            g = back.modules[key]
            assert torch.equal(f.a, g.a) and torch.equal(f.b, g.b)
            assert (f.scaling, f.role, f.bd_factor, f.nblocks) == (g.scaling, g.role, g.bd_factor, g.nblocks)


def _run(runtime, adapter, max_tokens=12, on_token=None):
    done, result = threading.Event(), {}
    req = make_request(0, "r", adapter, [5, 9, 13, 2, 7], max_tokens, on_token=on_token)
    runtime.submit(Submission(req, on_done=lambda ids, err: (result.update(ids=ids, err=err), done.set())))
    return done, result


def test_runtime_registers_and_retires_adapters_safely(tiny_llama, bd_adapters):
    spec = parse_adapter_arg(f"first:1={bd_adapters[0]}")
    engine = Engine(Comm(), str(tiny_llama), "bdlora", [(spec.task_id, spec.directory)], max_loras=2)
    runtime = Runtime(engine).start()
    try:
        done, reference = _run(runtime, 1)
        assert done.wait(60) and reference["err"] is None

        runtime.register_adapter(5, load_peft_adapter(bd_adapters[0]))  # the same weights under another id
        with pytest.raises(RequestError, match="already registered"):
            runtime.register_adapter(5, load_peft_adapter(bd_adapters[1]))

        started, release = threading.Event(), threading.Event()

        def on_token(_):
            started.set()
            release.wait(60)  # hold the engine between steps until the retirement has been checked

        done, running = _run(runtime, 5, on_token=on_token)
        assert started.wait(60)
        retire = threading.Thread(target=runtime.unregister_adapter, args=(5,))
        retire.start()
        release.set()
        retire.join(60)
        late_done, late = _run(runtime, 5)
        assert late_done.wait(60) and "unknown lora_task_id 5" in str(late["err"])
        assert done.wait(60) and running == reference  # the running request finished with the adapter
        deadline = time.monotonic() + 10
        while (5 in engine.pool or runtime.retiring) and time.monotonic() < deadline:  # right after, on the engine thread
            time.sleep(0.01)
        assert 5 not in engine.pool and not runtime.retiring  # and then it left
        with pytest.raises(RequestError, match="unknown lora_task_id"):
            runtime.unregister_adapter(5)
    finally:
        runtime.stop(30)


def test_loaded_adapters_live_in_the_bounded_host_cache(tiny_llama, bd_adapters):
    """Run-time loads are held like `--adapter` ones: capped at --max-lora-rank, pinned by default (a full cache
    refuses the next load with TensorRT-LLM's message); with --no-pin-adapters the least recently used is evicted and
    loses its OpenAI name."""
    from trtllm_bdlora.serving.openai.api import OpenAIServer

    adapter = load_peft_adapter(bd_adapters[1])
    for pinned in (True, False):
        engine = Engine(Comm(), str(tiny_llama), "bdlora", max_loras=2, pin_adapters=pinned, max_lora_rank=16)
        engine.pool.host_cache_bytes = 5 * shards_nbytes(engine.pool.prepare(adapter)) // 2  # room for two
        runtime = Runtime(engine).start()
        server = OpenAIServer(runtime, AdapterNames("base", "/m"), None)
        try:
            for task_id, name in ((1, "one"), (2, "two")):
                runtime.register_adapter(task_id, adapter)
                server.names.add(name, task_id, bd_adapters[1])
            assert engine.pool.pinned == ({1, 2} if pinned else set())
            with pytest.raises(RequestError, match="over --max-lora-rank 16"):
                runtime.register_adapter(4, load_peft_adapter(bd_adapters[2]))  # rank 32
            if pinned:
                with pytest.raises(RequestError, match="PEFT Cache is full"):
                    runtime.register_adapter(3, adapter)
                assert set(engine.pool.host) == {1, 2}
            else:
                runtime.register_adapter(3, adapter)
                assert list(engine.pool.host) == [2, 3]  # 1 was the least recently used
                assert server.registered() == {2, 3} and "one" not in server.names.ids
                with pytest.raises(BdLoraError) as info:
                    server.names.resolve("one", server.registered())
                assert info.value.status.http == 404
            runtime.unregister_adapter(2)
            assert 2 not in engine.pool and 2 not in engine.pool.pinned
        finally:
            runtime.stop(30)


@pytest.mark.parametrize("watch_first", [True, False], ids=["watch first", "collective first"])
def test_a_lost_rank_is_reported_by_its_cause_whichever_thread_sees_it_first(tiny_llama, monkeypatch, watch_first):
    """The rank watch's report (`rank_lost`: the rank, and its PID and host for the log) and the engine thread's
    collective that gave up because of it (the shared-memory all-reduce does) race: either way, the clients and
    serve's exit line (`failure`) get the watch's cause, not the collective's wrapping of it."""
    engine = Engine(Comm(), str(tiny_llama), "bdlora", max_loras=2)
    entered, release = threading.Event(), threading.Event()
    silent = RankLost(1, 4242, "h", 4.2, 4.0)

    def lead(plan):  # the idle heartbeat step, in a collective with the stopped rank
        entered.set()
        release.wait(30)
        raise RankLostError(f"rank 0 lost contact with the other ranks ({silent})", silent.summary, silent)

    monkeypatch.setattr(engine, "lead", lead)
    runtime = Runtime(engine).start()
    assert entered.wait(30)
    if watch_first:
        runtime.rank_lost(silent.summary, str(silent))
    release.set()
    assert runtime.stopped.wait(30)
    cause, detail = "rank 1 stopped responding: no heartbeat for 4.2 s (--rank-timeout 4)", str(silent)
    assert detail == "rank 1 (pid 4242 on h) stopped responding: no heartbeat for 4.2 s (--rank-timeout 4)"
    assert runtime.failure == detail and str(runtime.lost) == "server unavailable: " + cause
    with pytest.raises(BdLoraError) as refused:  # a request after the loss: refused with the cause
        _run(runtime, None)
    assert str(refused.value) == "server unavailable: " + cause
    runtime.rank_lost(silent.summary, str(silent))  # the watch's report, late: changes nothing
    assert runtime.failure == detail

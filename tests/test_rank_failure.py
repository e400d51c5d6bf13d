"""Multi-rank commands end when a rank dies: non-zero within 30 s, the rank's own error as one line, no process
left. Start-up errors are refused before any rank starts; a `build --backend torch` output serves as --model."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.helpers import REPO, make_tiny_llama, run_cli
from tests.reliability_helpers import marked_processes, wait_gone
from trtllm_bdlora import cli
from trtllm_bdlora.distributed import launcher


def _start(args, marker):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RELIABILITY_TEST=marker)
    return subprocess.Popen([sys.executable, "-m", "trtllm_bdlora", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _kill_rank_and_wait(args, rank: int, settle: float = 3.0):
    """Start a TP-2 command, SIGKILL one rank once both run, and return (returncode, seconds to exit, stderr, pids)."""
    marker = f"RELIABILITY_TEST={uuid.uuid4().hex}"
    proc = _start(args, marker.split("=")[1])
    deadline = time.monotonic() + 120
    while len(ranks := marked_processes(marker)) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.2)
    time.sleep(settle)
    assert proc.poll() is None, "the workload ended before the kill"
    os.kill(ranks[rank], signal.SIGKILL)
    killed = time.monotonic()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running 30 s after rank {rank} was killed")
    elapsed = time.monotonic() - killed
    return proc.returncode, elapsed, proc.stderr.read(), list(ranks.values()) + [proc.pid], ranks[rank]


@pytest.fixture(scope="module")
def long_requests(tmp_path_factory):
    path = tmp_path_factory.mktemp("reqs") / "long.jsonl"
    path.write_text("".join(json.dumps({"id": i, "adapter": None, "prompt_ids": [3, 4, i % 200], "max_tokens": 200}) + "\n"
                            for i in range(256)))
    return path


@pytest.mark.parametrize("rank", [1, 0])
def test_killing_a_rank_ends_generate(tiny_llama, long_requests, rank):
    rc, elapsed, err, pids, killed = _kill_rank_and_wait(
        ["generate", "--model", str(tiny_llama), "--tp", "2", "--requests", str(long_requests)], rank)
    print(f"RANK_KILL generate rank {rank}: exit {rc} after {elapsed:.1f} s")
    assert rc != 0 and elapsed < 30
    assert err.strip().splitlines() == [
        f"trtllm-bdlora generate: error: rank {rank} (pid {killed}) was killed by signal 9 (SIGKILL)"]
    assert wait_gone(pids, 5) == []


def test_killing_a_worker_ends_bench(tiny_llama):
    rc, elapsed, err, pids, killed = _kill_rank_and_wait(
        ["bench", "--model", str(tiny_llama), "--tp", "2", "--steps", "5000", "--batch", "4"], 1)
    print(f"RANK_KILL bench rank 1: exit {rc} after {elapsed:.1f} s")
    assert rc != 0 and elapsed < 30
    assert err.strip().splitlines()[-1] == f"trtllm-bdlora bench: error: rank 1 (pid {killed}) was killed by signal 9 (SIGKILL)"
    assert wait_gone(pids, 5) == []


@pytest.fixture(scope="module")
def torch_build(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "tp2"
    res = run_cli("build", "--model", str(tiny_llama), "--tp", "2", "--output", str(out), "--backend", "torch",
                  "--dtype", "float32")
    assert res.returncode == 0, res.stderr
    return out


def test_torch_build_serves_as_model(tiny_llama, bd_adapters, torch_build):
    requests = "".join(json.dumps({"id": i, "adapter": a, "prompt_ids": [5, 17, i], "max_tokens": 8}) + "\n"
                       for i, a in enumerate([1, None, 1]))
    outs = {}
    for model, tp in ((tiny_llama, "1"), (torch_build, "2")):
        res = run_cli("generate", "--model", str(model), "--tp", tp, "--adapter", f"1={bd_adapters[0]}", "--requests", "-",
                      stdin=requests)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[tp] = [json.loads(line)["output_ids"] for line in res.stdout.splitlines()]
    assert len(outs["1"]) == 3 and outs["2"] == outs["1"]


def test_a_rank_that_fails_alone_reports_its_own_error(torch_build, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in torch_build.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "rank1.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")  # only rank 1 reads it
    marker = uuid.uuid4().hex
    t0 = time.monotonic()
    proc = _start(["generate", "--model", str(broken), "--tp", "2", "--requests", "/dev/null"], marker)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"trtllm-bdlora generate: error: rank 1: {broken / 'rank1.safetensors'}: unreadable rank shard"), err
    assert marked_processes(f"RELIABILITY_TEST={marker}") == {}
    print(f"RANK_ERROR one rank failing alone: exit 2 after {time.monotonic() - t0:.1f} s (including start-up)")


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if a rank would be started."""

    def refuse(*args, **kwargs):
        raise AssertionError("a rank was launched")

    monkeypatch.setattr(launcher, "relaunch_ranks", refuse)


def _cli_error(capsys, *args):
    rc = cli.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_startup_errors_are_one_line_before_any_rank(tiny_llama, bd_adapters, torch_build, tmp_path, capsys, no_launch):
    nine_heads = make_tiny_llama(tmp_path / "nine", heads=9, kv_heads=3, hidden=144)
    capsys.readouterr()
    for command in ("generate", "serve"):
        extra = ["--requests", "-"] if command == "generate" else []
        assert "tp 2 does not divide num_attention_heads=9" in _cli_error(
            capsys, command, "--model", str(nine_heads), "--tp", "2", *extra)
        assert f"--adapter: task id 1 given twice ({bd_adapters[0]} and {bd_adapters[1]})" in _cli_error(
            capsys, command, "--model", str(tiny_llama), "--tp", "2", "--adapter", f"1={bd_adapters[0]}",
            "--adapter", f"1={bd_adapters[1]}", *extra)
        assert "built for --tp 2; run it with --tp 2" in _cli_error(
            capsys, command, "--model", str(torch_build), "--tp", "4", *extra)
        assert "rank 32, over --max-lora-rank 16" in _cli_error(
            capsys, command, "--model", str(tiny_llama), "--tp", "2", "--adapter", f"3={bd_adapters[2]}",
            "--max-lora-rank", "16", *extra)
        assert "adapter directory not found" in _cli_error(
            capsys, command, "--model", str(tiny_llama), "--tp", "2", "--adapter", f"1={tmp_path / 'none'}", *extra)
        assert "--comm-interface nosuch0: no such network interface" in _cli_error(
            capsys, command, "--model", str(tiny_llama), "--tp", "2", "--comm-interface", "nosuch0", *extra)


def test_build_under_mpirun_fails_fast_with_the_ranks_error(tiny_llama, tmp_path):
    """`build` is multi-rank only under the user's mpirun (TensorRT-LLM engines): a failing rank exits at once
    (no MPI finalize), so mpirun ends the job; here every rank lacks tensorrt_llm."""
    from trtllm_bdlora.distributed.launch import mpirun_command

    marker = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(REPO), RELIABILITY_TEST=marker)
    cmd = mpirun_command(2, ["build", "--model", str(tiny_llama), "--tp", "2", "--output", str(tmp_path / "e")])
    cmd[1:1] = ["-x", "RELIABILITY_TEST"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    print(f"RANK_ERROR build under mpirun: exit {res.returncode} after {time.monotonic() - t0:.1f} s")
    assert res.returncode != 0
    assert re.search(r"trtllm-bdlora build: error: rank [01]: --backend trtllm needs the 'tensorrt_llm' package",
                     res.stderr), res.stderr
    assert marked_processes(f"RELIABILITY_TEST={marker}") == {}


@pytest.mark.parametrize("user_level", [None, "INFO"])
def test_ranks_keep_c10d_warnings_off_the_terminal_unless_asked(tmp_path, monkeypatch, user_level):
    """A rank that dies leaves the others' c10d clients printing a warning with a C++ stack ("TCPStore recvValue
    failed ... Connection reset by peer") in the user's terminal before the launcher stops them: the ranks it
    starts run with TORCH_CPP_LOG_LEVEL=ERROR, unless the environment sets a level (kept)."""
    (tmp_path / "env_probe.py").write_text(
        "import os, pathlib, sys\n"
        "pathlib.Path(sys.argv[1], os.environ['TRTLLM_BDLORA_RANK']).write_text(os.environ.get('TORCH_CPP_LOG_LEVEL', '-'))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    if user_level is None:
        monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", user_level)
    out = tmp_path / "levels"
    out.mkdir()
    assert launcher.relaunch_ranks(2, [str(out)], module="env_probe") == 0
    assert {p.name: p.read_text() for p in out.iterdir()} == {r: user_level or "ERROR" for r in ("0", "1")}

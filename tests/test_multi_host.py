"""Tensor parallelism across hosts under the user's own `mpirun` (docs/multi-host.md), on test hosts made of network
namespaces on this machine (tests/netns_hosts.py): at TP 2 (one rank per host) and TP 4 (two hosts x two ranks),
every scheme, mixed adapters, the output equals the single-host `generate` (`generate` across hosts; S-LoRA at
TP 4 through `serve`, whose gRPC and OpenAI endpoints answer a client on a third host from rank 0's host, its
ranks listening only on the interface); `bench --comm-interface` runs across hosts; hosts that disagree are
refused with one line; a host cut off, or killed, mid-generation ends every rank within the documented bound,
the client gets an error and nothing is left behind.

Needs root, iproute2 and Open MPI's mpirun: skipped where it cannot run (not root, no `ip`), failed anywhere else,
CI included (.ci/run installs iproute2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, make_peft_adapter, make_tiny_llama, run_cli
from tests.netns_hosts import IFACE, Host, NetnsHosts, missing_requirements
from trtllm_bdlora.config import DEFAULT_RANK_TIMEOUT_S
from trtllm_bdlora.distributed.liveness import heartbeat_interval
from trtllm_bdlora.serving.server import LOST_RANK_LINGER_S

MAX_TOKENS = 8
REQUESTS = [  # mixed adapters in one batch: BD-LoRA r16, plain LoRA, the base model, BD-LoRA r8
    {"id": "bd16", "adapter": 1, "prompt_ids": [5, 6, 7, 8, 9], "max_tokens": MAX_TOKENS, "temperature": 0.0},
    {"id": "plain", "adapter": 2, "prompt_ids": [11, 12, 13], "max_tokens": MAX_TOKENS, "temperature": 0.0},
    {"id": "base", "adapter": None, "prompt_ids": [21, 22], "max_tokens": MAX_TOKENS, "temperature": 0.0},
    {"id": "bd8", "adapter": 3, "prompt_ids": [31, 32, 33, 34], "max_tokens": MAX_TOKENS, "temperature": 0.0},
]
PROMPTS = [("Hello there", 1), ("The capital of France is", 2), ("Once upon a time", None)]
PORTS = {"--grpc-port": 19111, "--http-port": 19112, "--metrics-port": 19113, "--openai-port": 19114}
# a host cut off: rank 0's rank watch finds its rank silent within --rank-timeout + 2 heartbeat intervals
# (docs/reliability.md), serve answers "unavailable" for LOST_RANK_LINGER_S and exits; the cut-off rank finds rank 0
# silent as fast; one second to exit; mpirun's daemons follow once TCP gives up on the lost host (tcp_retries2 = 5,
# docs/multi-host.md)
CUT_OFF_BOUND_S = DEFAULT_RANK_TIMEOUT_S + 2 * heartbeat_interval(DEFAULT_RANK_TIMEOUT_S) + LOST_RANK_LINGER_S + 1 + 4
MPIRUN_BOUND_S = 45
KILLED_BOUND_S = 5


@pytest.fixture(scope="module", autouse=True)
def _netns_available():
    why = missing_requirements()
    if why is None:
        return
    if (os.geteuid() == 0 and shutil.which("ip")) or os.environ.get("TRTLLM_BDLORA_REQUIRE_NETNS"):
        pytest.fail(f"test hosts (network namespaces) required but {why}")
    pytest.skip(why)


def _env(hosts: NetnsHosts) -> dict[str, str]:
    return dict(hosts.env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _mpirun(hosts: NetnsHosts, slots: list[tuple[Host, int]], args: list[str]) -> list[str]:
    return hosts.mpirun_argv(slots, [sys.executable, "-m", "trtllm_bdlora", *args, "--comm-interface", IFACE],
                             export=("OMP_NUM_THREADS",))


def _rank_pids(hosts: NetnsHosts, host: Host) -> list[int]:
    """Processes of this package on `host` (the ranks), not mpirun's daemons or the agent's shells."""
    return [pid for pid, argv in hosts.processes(host).items()
            if argv and Path(argv[0]).name.startswith("python") and "trtllm_bdlora" in argv]


def test_test_hosts_are_separate_machines_and_cleaned_up_on_failure():
    """Each host has its own hostname, only lo and its link-local eth0, reaches the others and nothing else; a
    failure inside the context still removes every namespace, link and process it made."""
    import subprocess as sp

    with pytest.raises(RuntimeError, match="inside"), NetnsHosts(2) as made:
        h1, h2 = made.hosts
        names = [made.run(h, ["hostname"]).stdout.strip() for h in made.hosts]
        assert names == [h1.name, h2.name]
        links = made.run(h1, ["ip", "-o", "-4", "addr", "show"]).stdout
        assert {line.split()[1] for line in links.splitlines()} == {"lo", IFACE} and f"{h1.addr}/24" in links
        assert made.run(h1, [sys.executable, "-c", f"import socket; socket.create_connection(('{h2.addr}', 9), 5)"]
                        ).stderr.strip().endswith("Connection refused")  # reached: nothing listens there
        root_ns = sp.run([sys.executable, "-c", f"import socket; socket.create_connection(('{h2.addr}', 9), 2)"],
                         capture_output=True, text=True).stderr
        assert "Connection refused" not in root_ns  # unreachable from outside the test hosts
        sleeper = made.popen(h2, ["sleep", "600"])
        made_names = [made.bridge_ns, h1.name, h2.name]
        raise RuntimeError("inside")
    listed = sp.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in made_names)
    assert sleeper.wait(10) is not None and not Path(f"/etc/netns/{h2.name}").exists()


@pytest.fixture(scope="module")
def hosts():
    """h1 and h2 run ranks (mpirun starts on h1); h3 is a client machine."""
    with NetnsHosts(3) as made:
        yield made


@pytest.fixture(scope="module")
def adapters(tiny_llama, bd_adapters, lora_adapter) -> list[str]:
    return ["--adapter", f"1={bd_adapters[0]}", "--adapter", f"2={lora_adapter}", "--adapter", f"3={bd_adapters[1]}"]


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multi_host") / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return path


@pytest.fixture(scope="module")
def single_host_ids(tiny_llama, adapters, requests_file) -> list[list[int]]:
    res = run_cli("generate", "--model", str(tiny_llama), *adapters, "--requests", str(requests_file))
    assert res.returncode == 0, res.stderr[-3000:]
    outputs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [o["id"] for o in outputs] == [r["id"] for r in REQUESTS]
    assert all(len(o["output_ids"]) == MAX_TOKENS for o in outputs)
    return [o["output_ids"] for o in outputs]


# TP 4 with slora runs as `serve` (test_serve_across_hosts_answers_from_rank0_host), against the same reference
@pytest.mark.parametrize("tp,per_host,scheme", [(2, 1, "bdlora"), (2, 1, "slora"), (2, 1, "replicated"),
                                                (4, 2, "bdlora"), (4, 2, "replicated")],
                         ids=["tp2-bdlora", "tp2-slora", "tp2-replicated", "tp4-bdlora", "tp4-replicated"])
def test_generate_across_hosts_equals_single_host(hosts, tiny_llama, adapters, requests_file, single_host_ids,
                                                  tp, per_host, scheme):
    h1, h2, _ = hosts.hosts
    cmd = _mpirun(hosts, [(h1, per_host), (h2, per_host)],
                  ["generate", "--model", str(tiny_llama), "--tp", str(tp), "--scheme", scheme, *adapters,
                   "--requests", str(requests_file), "--stats"])
    res = hosts.run(h1, cmd, env=_env(hosts), timeout=300)
    assert res.returncode == 0, "\n".join(line for line in res.stderr.splitlines() if "c10d" not in line)[-6000:]
    outputs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [o["output_ids"] for o in outputs] == single_host_ids
    lora_collectives = sum(o["stats"]["lora_collectives"] for o in outputs)
    assert (lora_collectives > 0) == (scheme == "slora")  # S-LoRA's extra collectives crossed the hosts


def test_bench_across_hosts(hosts, tiny_llama, tmp_path):
    """`bench --comm-interface` under mpirun across hosts (it used to ignore the flag and refuse the launch)."""
    h1, h2, _ = hosts.hosts
    out = tmp_path / "bench.json"
    cmd = _mpirun(hosts, [(h1, 1), (h2, 1)], ["bench", "--model", str(tiny_llama), "--tp", "2", "--steps", "2",
                                              "--batch", "2", "--num-adapters", "2", "--json", str(out)])
    res = hosts.run(h1, cmd, env=_env(hosts), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tp"] == 2
    assert {s: r["lora_collectives"] > 0 for s, r in report["schemes"].items()} == {
        "none": False, "bdlora": False, "slora": True, "replicated": False}
    assert all(r["n"] == 2 and r["median_ms"] > 0 for r in report["schemes"].values())


def _start_serve(hosts: NetnsHosts, slots: list[tuple[Host, int]], model: Path, extra: list[str], log: Path
                 ) -> subprocess.Popen:
    args = ["serve", "--model", str(model), "--tp", str(sum(k for _, k in slots)), "--host", slots[0][0].addr,
            *[x for flag, port in PORTS.items() for x in (flag, str(port))], *extra]
    return hosts.popen(slots[0][0], _mpirun(hosts, slots, args), env=_env(hosts), stdout=open(log, "w"),
                       stderr=subprocess.STDOUT)


def _wait_serving(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while " trtllm_bdlora.server serving models=" not in log.read_text():  # the line once every endpoint listens
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"serve did not start (exit {proc.poll()}): {log.read_text()[-3000:]}")
        time.sleep(0.3)


def _mpirun_pid(hosts: NetnsHosts, host: Host) -> int:
    return next(pid for pid, argv in hosts.processes(host).items() if argv and Path(argv[0]).name == "prterun")


def _client(hosts: NetnsHosts, spec: dict) -> subprocess.Popen:
    return hosts.popen(hosts.hosts[-1], [sys.executable, "-m", "tests.netns_client", json.dumps(spec)],
                       env=_env(hosts), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def tokenizer_adapters(tiny_llama_with_tokenizer, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("mh_adapters")
    model = tiny_llama_with_tokenizer
    return {1: make_peft_adapter(model, root / "bd", seed=71, r=16),
            2: make_peft_adapter(model, root / "plain", seed=72, r=8, nblocks=None)}


def test_serve_across_hosts_answers_from_rank0_host(hosts, tiny_llama_with_tokenizer, tokenizer_adapters, tmp_path):
    """TP 4 on two hosts x two ranks (S-LoRA: LoRA collectives cross the hosts): a client on a third host gets
    the single-host `generate` text over gRPC and over OpenAI from rank 0's host; every socket a rank listens on
    is bound to its host's interface address."""
    h1, h2, _ = hosts.hosts
    model = tiny_llama_with_tokenizer
    flags = [x for t, d in tokenizer_adapters.items() for x in ("--adapter", f"{t}={d}")]
    requests = [{"id": i, "adapter": a, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0.0}
                for i, (p, a) in enumerate(PROMPTS)]
    reference = run_cli("generate", "--model", str(model), *flags, "--requests", "-",
                        stdin="".join(json.dumps(r) + "\n" for r in requests))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = [json.loads(line)["text"] for line in reference.stdout.splitlines()]
    log = tmp_path / "serve.log"
    proc = _start_serve(hosts, [(h1, 2), (h2, 2)], model, ["--scheme", "slora", *flags], log)
    try:
        _wait_serving(proc, log)
        for host in (h1, h2):
            ranks = set(_rank_pids(hosts, host))
            assert len(ranks) == 2, hosts.processes(host)
            bound = [(proto, local) for proto, local, pid in hosts.listening(host) if pid in ranks]
            assert bound and all(local.rsplit(":", 1)[0] == host.addr for _, local in bound), bound
        spec = {"mode": "complete", "host": h1.addr, "grpc": PORTS["--grpc-port"], "openai": PORTS["--openai-port"],
                "requests": [{"prompt": p, "adapter": a, "max_tokens": MAX_TOKENS} for p, a in PROMPTS]}
        client = _client(hosts, spec)
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err[-2000:] + log.read_text()[-3000:]
        answers = [json.loads(line) for line in out.splitlines()]
        assert [a["grpc"] for a in answers] == expected
        assert [a["openai"] for a in answers] == expected
    finally:
        if proc.poll() is None:
            os.kill(_mpirun_pid(hosts, h1), signal.SIGUSR1)  # rank 0 drains and stops the workers
        rc = proc.wait(60)
    assert rc == 0, log.read_text()[-3000:]


def test_hosts_that_disagree_are_refused_before_serving(tiny_llama, tmp_path):
    """Host 2 has another model at the same path: refused with one line naming both hosts, nothing served."""
    other = make_tiny_llama(tmp_path / "other", seed=5)
    with NetnsHosts(2) as hosts:
        h1, h2 = hosts.hosts
        hosts.host_file(h2, other, tiny_llama)
        log = tmp_path / "serve.log"
        proc = _start_serve(hosts, [(h1, 1), (h2, 1)], tiny_llama, [], log)
        assert proc.wait(240) != 0
        output = log.read_text()
        errors = [line for line in output.splitlines() if "trtllm-bdlora serve: error:" in line]
        assert len(errors) == 1, output[-3000:]
        assert f"the hosts disagree on model {tiny_llama}" in errors[0]
        assert h1.name in errors[0] and h2.name in errors[0]
        assert "serving" not in output
        deadline = time.monotonic() + 10  # mpirun has returned; the processes it ended may still be exiting
        while (hosts.pids(h1) or hosts.pids(h2)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not hosts.processes(h1) and not hosts.processes(h2), (hosts.processes(h1), hosts.processes(h2))


@pytest.mark.parametrize("loss", ["cut off", "killed"])
def test_host_lost_mid_generation(tiny_llama_with_tokenizer, tmp_path, loss):
    """A host's link taken down, or all its processes killed, while a streamed completion runs: the client gets
    an error, every rank on both hosts exits within the bound, mpirun exits naming the host (cut off: status 1
    and serve's one-line cause), and no process is left on any host."""
    with NetnsHosts(3) as hosts:
        h1, h2, _ = hosts.hosts
        for host in (h1, h2):  # docs/multi-host.md: what each host needs for mpirun to give up on a lost host
            hosts.sysctl(host, "net.ipv4.tcp_retries2", "5")
        log = tmp_path / "serve.log"
        proc = _start_serve(hosts, [(h1, 1), (h2, 1)], tiny_llama_with_tokenizer, [], log)
        try:
            _wait_serving(proc, log)
            spec = {"mode": "stream", "host": h1.addr, "openai": PORTS["--openai-port"], "prompt": "Once upon a time",
                    "adapter": None, "max_tokens": 200}
            client = _client(hosts, spec)
            assert json.loads(client.stdout.readline()) == {"first": True}, log.read_text()[-3000:]
            ranks = {h: _rank_pids(hosts, h) for h in (h1, h2)}
            assert all(len(p) == 1 for p in ranks.values()), ranks
            t0 = time.monotonic()
            hosts.link_down(h2) if loss == "cut off" else hosts.kill_host(h2)
            result = json.loads(client.stdout.readline())
            client_s = time.monotonic() - t0
            client.wait(30)
            assert not result["finished"] and result["tokens"] < 200, result
            bound = CUT_OFF_BOUND_S if loss == "cut off" else KILLED_BOUND_S
            while any(_rank_pids(hosts, h) for h in (h1, h2)) and time.monotonic() - t0 < bound:
                time.sleep(0.1)
            ranks_left = {h.name: _rank_pids(hosts, h) for h in (h1, h2)}
            ranks_ended = time.monotonic() - t0
            rc = proc.wait(MPIRUN_BOUND_S)
            print(f"HOST_LOST {loss}: client answered after {client_s:.1f} s, ranks ended after {ranks_ended:.1f} s, "
                  f"mpirun exit {rc} after {time.monotonic() - t0:.1f} s; client: {result}")
            assert not any(ranks_left.values()), ranks_left
            if loss == "cut off":  # rank 0 exits 1 first; mpirun reports that status
                assert rc == 1
            # killed: mpirun's own status (255, or 0 when its connection to the lost daemon breaks before the
            # agent exits: Open MPI 5.0.11; docs/multi-host.md); it ends every rank itself, at once
            deadline = time.monotonic() + 10
            while (hosts.pids(h1) or hosts.pids(h2)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not hosts.processes(h1) and not hosts.processes(h2), (hosts.processes(h1), hosts.processes(h2))
        finally:
            if proc.poll() is None:
                proc.kill()
        output = log.read_text()
        if loss == "cut off":  # rank 0 names the host it lost, once
            errors = [line for line in output.splitlines() if "trtllm-bdlora serve: error:" in line]
            assert len(errors) == 1 and f"lost host {h2.name} (rank 1)" in errors[0], output[-3000:]
            assert result["error"] and h2.name in result["error"], result
        else:  # mpirun sees the lost daemon first and ends rank 0 at once: its message names the host
            assert f"Remote host:   {h2.name}" in output or f"on node {h2.name}" in output, output[-3000:]

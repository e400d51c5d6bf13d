"""The paper's mechanism as link latency grows: `bench` across 2 and 4 hosts (one rank per host, test hosts made of
network namespaces: tests/netns_hosts.py) with a fixed delay added to every packet each host sends, then the
projection fed with the latency and bandwidth measured across those hosts, and its error per cell.

Per host count N (TP N) and delay d:
  link        UDP round trip h1 <-> h2 (median of 200), halved: the one-way latency reached
  gloo        latency-bandwidth fit per collective across the hosts (perf/cpu_validate.py's micro-benchmark)
  measured    `trtllm-bdlora bench --tp N --comm-interface eth0` under mpirun across the hosts: step time per scheme
              (none, bdlora, slora, replicated, interleaved) and LoRA collectives per step
  predicted   perf/cpu_validate.predict: rank 0's compute measured once per N on this machine (collectives
              stubbed, as in docs/performance.md section 3) + step_collectives priced with the gloo fit above
The delay: the kernel here has no netem qdisc, so benchmarks/netns_delay.py holds each host's outgoing packets
(NFQUEUE) for d. Needs root, iproute2, iptables.

  python benchmarks/latency_sweep.py --model small --out docs/perf/latency_sweep.json --plot docs/perf/latency_sweep.png
  python benchmarks/latency_sweep.py --table docs/perf/latency_sweep.json      (the markdown table)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.netns_hosts import IFACE, NetnsHosts  # noqa: E402
from trtllm_bdlora.perf import cpu_validate  # noqa: E402
from trtllm_bdlora.perf.cost_model import SCHEMES  # noqa: E402

UDP_PING = """
import socket, statistics, sys, time
mode, addr = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode == "server":
    s.bind((addr, 19190))
    while True:
        d, a = s.recvfrom(64)
        s.sendto(d, a)
ts = []
for _ in range(220):
    t0 = time.perf_counter(); s.sendto(b"x" * 32, (addr, 19190)); s.recvfrom(64); ts.append(time.perf_counter() - t0)
print(statistics.median(ts[20:]))
"""


def small_model(directory: Path) -> Path:
    """A random Llama whose decode step is small beside its collectives, as on a GPU (docs/performance.md)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@contextmanager
def delayed(hosts: NetnsHosts, delay_us: float):
    """Every packet each host sends on its interface held for `delay_us` (nothing at 0)."""
    daemons = []
    try:
        if delay_us > 0:
            for h in hosts.hosts:
                proc = subprocess.Popen(["ip", "netns", "exec", h.name, sys.executable, str(REPO / "benchmarks" / "netns_delay.py"),
                                         "--delay-us", str(delay_us)], stdout=subprocess.PIPE, text=True)
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError("netns_delay.py did not start")
                daemons.append(proc)
                subprocess.run(["ip", "netns", "exec", h.name, "iptables", "-A", "OUTPUT", "-o", IFACE, "-j", "NFQUEUE",
                                "--queue-num", "0", "--queue-bypass"], check=True)
        yield
    finally:
        for h in hosts.hosts:
            subprocess.run(["ip", "netns", "exec", h.name, "iptables", "-F", "OUTPUT"], capture_output=True)
        for proc in daemons:
            proc.kill()
            proc.wait()


def one_way_latency_s(hosts: NetnsHosts) -> float:
    h1, h2 = hosts.hosts[:2]
    server = subprocess.Popen(["ip", "netns", "exec", h2.name, sys.executable, "-c", UDP_PING, "server", h2.addr])
    try:
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", h1.name, sys.executable, "-c", UDP_PING, "client", h2.addr],
                             capture_output=True, text=True, check=True, timeout=120)
        return float(out.stdout) / 2
    finally:
        server.kill()
        server.wait()


def _mpirun(hosts: NetnsHosts, argv: list[str]) -> None:
    cmd = hosts.mpirun_argv([(h, 1) for h in hosts.hosts], argv, export=("OMP_NUM_THREADS",))
    res = hosts.run(hosts.hosts[0], cmd, env=dict(hosts.env, **_env()), timeout=1800)
    if res.returncode:
        raise RuntimeError(f"{' '.join(argv[:6])}: exit {res.returncode}: {res.stderr[-2000:]}")


def gloo_fit(hosts: NetnsHosts, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gloo.json"
        _mpirun(hosts, [sys.executable, "-m", "trtllm_bdlora.perf.cpu_validate", "gloo-worker", str(out), str(reps),
                        IFACE])
        raw = json.loads(out.read_text())
    return {kind: {"latency_s": a, "s_per_byte": b, "samples": s} for kind, s in raw["samples"].items()
            for a, b in [cpu_validate.fit(s)]}


def bench(hosts: NetnsHosts, model_dir: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        _mpirun(hosts, [sys.executable, "-m", "trtllm_bdlora", "bench", "--model", model_dir, "--tp", str(len(hosts.hosts)),
                        "--comm-interface", IFACE, "--batch", str(args.batch), "--num-adapters", str(args.num_adapters),
                        "--rank", str(args.rank), "--steps", str(args.steps), "--prompt-len", str(args.prompt_len),
                        "--threads", "1", "--max-loras", str(args.max_loras), "--json", str(out)])
        return json.loads(out.read_text())


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for n, marker in ((2, "o"), (4, "s")):
        rows = sorted((c for c in cells if c["hosts"] == n), key=lambda c: c["one_way_latency_us"])
        if not rows:
            continue
        x = [c["one_way_latency_us"] for c in rows]
        left.plot(x, [c["speedup_measured"] for c in rows], marker=marker, label=f"{n} hosts, measured")
        left.plot(x, [c["speedup_predicted"] for c in rows], marker=marker, ls="--", label=f"{n} hosts, projected")
        for scheme in ("bdlora", "slora"):
            right.plot(x, [c["schemes"][scheme]["measured_ms"] for c in rows], marker=marker,
                       label=f"{scheme}, {n} hosts")
    left.set(xscale="symlog", xlabel="one-way link latency (us)", ylabel="BD-LoRA speed-up over S-LoRA",
             title="speed-up vs link latency")
    right.set(xscale="symlog", yscale="log", xlabel="one-way link latency (us)", ylabel="decode step (ms)",
              title="step time (measured)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def table(path: Path) -> str:
    """The sweep as markdown: one row per cell and scheme."""
    data = json.loads(path.read_text())
    lines = ["| hosts | delay us | one-way us (measured) | scheme | LoRA coll/step | measured ms (p25-p75) | projected ms "
             "| error | BD-LoRA vs S-LoRA measured / projected |", "|---|---|---|---|---|---|---|---|---|"]
    for c in data["cells"]:
        for scheme, r in c["schemes"].items():
            speed = f"{c['speedup_measured']:.2f}x / {c['speedup_predicted']:.2f}x" if scheme == "bdlora" else ""
            lines.append(f"| {c['hosts']} | {c['delay_us']:.0f} | {c['one_way_latency_us']:.0f} | {scheme} | "
                         f"{r['lora_collectives']} | {r['measured_ms']:.1f} ({r['p25_ms']:.1f}-{r['p75_ms']:.1f}) | "
                         f"{r['predicted_ms']:.1f} | {r['error_pct']:+.0f}% | {speed} |")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--table"]:
        print(table(Path(sys.argv[2])))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="latency_sweep.json")
    p.add_argument("--plot", default=None)
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    p.add_argument("--delays-us", type=float, nargs="+", default=[0, 100, 500, 2000])
    p.add_argument("--model", default=None, help="HF Llama dir, or 'small' (small_model); default: cpu_validate's "
                                                 "random 8-head Llama (hidden 512)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # leave through the context managers: hosts removed
    from trtllm_bdlora.llama.loader import load_base_model

    cells, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (str(small_model(Path(tmp) / "small")) if args.model == "small"
                     else args.model or str(cpu_validate._random_model(Path(tmp) / "model")))
        base = load_base_model(model_dir)
        cores = os.cpu_count() or 1
        for n in args.hosts:
            compute = cpu_validate.measure_compute(base, n, args)
            with NetnsHosts(n) as hosts:
                for delay in args.delays_us:
                    with delayed(hosts, delay):
                        loads.append(os.getloadavg()[0])
                        latency = one_way_latency_s(hosts)
                        gloo = gloo_fit(hosts, args.reps)
                        measured = bench(hosts, model_dir, args)
                    predicted = cpu_validate.predict(compute, gloo, base.shape, n, args, cores)
                    cell = {"hosts": n, "tp": n, "delay_us": delay, "one_way_latency_us": latency * 1e6,
                            "load_1min": loads[-1],
                            "gloo_fits": {k: {"latency_us": v["latency_s"] * 1e6, "us_per_kib": v["s_per_byte"] * 1024e6}
                                          for k, v in gloo.items()},
                            "schemes": {}}
                    for scheme in SCHEMES:
                        m = measured["schemes"][scheme]
                        cell["schemes"][scheme] = {
                            "measured_ms": m["median_ms"], "p25_ms": m["p25_ms"], "p75_ms": m["p75_ms"],
                            "predicted_ms": predicted[scheme]["total"] * 1e3,
                            "error_pct": 100 * (predicted[scheme]["total"] * 1e3 / m["median_ms"] - 1),
                            "lora_collectives": m["lora_collectives"], "base_collectives": m["base_collectives"],
                            "predicted_breakdown_ms": {k: v * 1e3 for k, v in predicted[scheme].items()}}
                    s = cell["schemes"]
                    cell["speedup_measured"] = s["slora"]["measured_ms"] / s["bdlora"]["measured_ms"]
                    cell["speedup_predicted"] = s["slora"]["predicted_ms"] / s["bdlora"]["predicted_ms"]
                    cells.append(cell)
                    print(f"hosts {n} delay {delay:6.0f} us (one-way {latency * 1e6:7.0f} us, load {loads[-1]:.1f}): "
                          + "  ".join(f"{k} {v['measured_ms']:.1f}/{v['predicted_ms']:.1f} ms ({v['error_pct']:+.0f}%)"
                                      for k, v in s.items())
                          + f"  bdlora vs slora {cell['speedup_measured']:.2f}x measured, "
                            f"{cell['speedup_predicted']:.2f}x projected", flush=True)
    Path(args.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "cores": cores,
        "machine": "2 shared cores, no GPU; N hosts = N network namespaces on this one machine (one rank each): "
                   "4 ranks oversubscribe the 2 cores",
        "delay_method": "benchmarks/netns_delay.py (NFQUEUE, userspace, SCHED_FIFO): the kernel has no netem",
        "workload": {"batch": args.batch, "adapters": args.num_adapters, "rank": args.rank, "steps": args.steps,
                     "prompt_len": args.prompt_len, "dtype": args.dtype},
        "model": {"hidden": base.shape.hidden_size, "layers": base.shape.num_layers, "heads": base.shape.num_heads,
                  "vocab": base.shape.vocab_size},
        "cells": cells}, indent=1))
    if args.plot:
        plot(cells, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())

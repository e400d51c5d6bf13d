"""Serving benchmark with NVIDIA's AIPerf against `trtllm-bdlora serve`'s OpenAI API.

Once per LoRA scheme, start `serve --model smollm2-135m --tp N --scheme S` with the example adapters
(`upper`, `reverse`, `json`), run `aiperf profile` with a mixed-adapter chat workload (requests round-robin over
the base model and every adapter, streamed, greedy) over a concurrency sweep, stop the server; then write
AIPerf's TTFT, inter-token latency, request throughput and output-token throughput per scheme and concurrency
into a section of docs/performance.md (replaced on re-runs), with AIPerf's own plots where it can draw them
(PNG export needs Chrome or Chromium for kaleido).

  pip install aiperf        # or in its own virtual environment, then pass --aiperf ENV/bin/aiperf
  flock /tmp/trtllm-bdlora-measure.lock python benchmarks/serve_bench.py --tp 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = {"upper": 1, "reverse": 2, "json": 3}
START, END = "<!-- serve_bench:start -->", "<!-- serve_bench:end -->"
HEADING = "## OpenAI API under NVIDIA AIPerf: mixed adapters, concurrency sweep (`benchmarks/serve_bench.py`)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(args, scheme: str, openai_port: int) -> list[str]:
    """`serve` on free ports (KServe gRPC/HTTP and metrics too: the machine may run other servers)."""
    cmd = [sys.executable, "-m", "trtllm_bdlora", "serve", "--model", args.model, "--tp", str(args.tp),
           "--scheme", scheme, "--grpc-port", str(free_port()), "--http-port", str(free_port()),
           "--metrics-port", str(free_port()), "--openai-port", str(openai_port),
           "--max-batch-size", str(args.max_batch_size)]
    for name, task_id in ADAPTERS.items():
        cmd += ["--adapter", f"{name}:{task_id}={REPO / 'examples' / 'adapters' / name}"]
    return cmd


def aiperf_command(args, port: int, out: Path, tokenizer: str) -> list[str]:
    return [args.aiperf, "profile", "--model-names", ",".join([args.model, *ADAPTERS]),
            "--model-selection-strategy", "round-robin", "--endpoint-type", "chat", "--streaming",
            "--url", f"http://127.0.0.1:{port}", "--tokenizer", tokenizer,
            "--concurrency", args.concurrency, "--request-count", str(args.requests),
            "--warmup-request-count", str(len(ADAPTERS) + 1), "--isl", str(args.isl), "--isl-stddev", "0",
            "--osl", str(args.osl), "--random-seed", "0", "--extra-inputs", "temperature:0",
            "--output-artifact-dir", str(out), "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry"]


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                if len(json.load(r)["data"]) == len(ADAPTERS) + 1:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"serve not ready after {timeout:.0f} s; see {log}")


def run_scheme(args, scheme: str, out: Path, tokenizer: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    openai_port = free_port()
    log = out / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as log_file:
        server = subprocess.Popen(serve_command(args, scheme, openai_port), stdout=log_file,
                                  stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            t0 = time.time()
            wait_ready(server, openai_port, log, args.start_timeout)
            print(f"[{scheme}] serve ready in {time.time() - t0:.0f} s; running AIPerf", flush=True)
            with open(out / "aiperf.log", "w") as aiperf_log:
                res = subprocess.run(aiperf_command(args, openai_port, out / "aiperf", tokenizer), stdout=aiperf_log,
                                     stderr=subprocess.STDOUT, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"aiperf exited {res.returncode}; see {out / 'aiperf.log'}")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()


def metric(data: dict, name: str, stat: str = "avg") -> float:
    value = (data.get(name) or {}).get(stat)
    return float("nan") if value is None else float(value)


def count(data: dict, name: str) -> int:
    value = (data.get(name) or {}).get("avg")
    return 0 if value is None else int(value)


def run_dirs(out: Path, concurrency: str) -> list[tuple[int, Path]]:
    """(concurrency, AIPerf run directory): one per sweep value, or the single run when nothing was swept."""
    sweep = [(int(p.parent.name.split("_")[1]), p.parent) for p in out.glob("concurrency_*/profile_export_aiperf.json")]
    if sweep:
        return sorted(sweep)
    return [(int(concurrency), out)] if (out / "profile_export_aiperf.json").exists() else []


def collect(out: Path, scheme: str, concurrency: str) -> list[dict]:
    rows = []
    for level, run in run_dirs(out / "aiperf", concurrency):
        data = json.loads((run / "profile_export_aiperf.json").read_text())
        rows.append({
            "scheme": scheme, "concurrency": level,
            "requests": count(data, "request_count"), "errors": count(data, "error_request_count"),
            "ttft_ms": metric(data, "time_to_first_token"), "ttft_p99_ms": metric(data, "time_to_first_token", "p99"),
            "itl_ms": metric(data, "inter_token_latency"), "req_per_s": metric(data, "request_throughput"),
            "out_tok_per_s": metric(data, "output_token_throughput"), "osl": metric(data, "output_sequence_length"),
        })
    return rows


def plot(args, out: Path, scheme: str, images: Path) -> list[Path]:
    """AIPerf's own multi-run plots over the concurrency sweep, shrunk to small PNGs in `images`."""
    runs = [str(run) for _, run in run_dirs(out / "aiperf", args.concurrency)]
    subprocess.run([args.aiperf, "plot", *runs, "--output", str(out / "plots")], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    saved = []
    for png in sorted((out / "plots").glob("*.png")):
        target = images / f"{scheme}_{png.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            from PIL import Image

            with Image.open(png) as image:
                image.thumbnail((1000, 500))
                image.save(target, optimize=True)
        except ImportError:
            shutil.copyfile(png, target)
        saved.append(target)
    return saved


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = ""
    if Path("/proc/meminfo").exists():
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    load = f", load average {os.getloadavg()[0]:.1f} when the run ended" if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){mem}, {platform.system()} {platform.release()}, no GPU{load}"


def section(args, rows: list[dict], images: list[Path], doc: Path, command: str, aiperf_version: str) -> str:
    date = datetime.date.today().isoformat()
    note = f" ({args.machine_note})" if args.machine_note else ""
    lines = [START, "", f"Measured {date} on {machine()}{note}. AIPerf {aiperf_version}, "
             f"`serve --model {args.model} --tp {args.tp} --scheme S` (torch backend, float32, gloo over loopback), "
             f"the three example adapters (BD-LoRA, rank 12, nblocks 3) registered as `upper`, `reverse`, `json`. "
             f"Workload: chat completions round-robin over the base model and the three adapters, AIPerf's synthetic "
             f"prompts of {args.isl} tokens (before the chat template), at most {args.osl} output tokens, greedy "
             f"(so every scheme generates the same tokens), streamed; {args.requests} requests per concurrency after "
             f"{len(ADAPTERS) + 1} warm-up requests. CPU figures: they show the serving stack and the schemes' "
             f"relative cost here, not GPU speed.", "", "```", command, "```", "",
             "| scheme | concurrency | requests (errors) | TTFT avg ms | TTFT p99 ms | ITL avg ms | requests/s "
             "| output tokens/s | output tokens/request |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['concurrency']} | {r['requests']} ({r['errors']}) | {r['ttft_ms']:.0f} | "
                     f"{r['ttft_p99_ms']:.0f} | {r['itl_ms']:.0f} | {r['req_per_s']:.3f} | {r['out_tok_per_s']:.2f} | "
                     f"{r['osl']:.1f} |")
    lines += ["", f"AIPerf ran unmodified (`{args.aiperf}`; its arguments are in each run's `run_config.json`). It warns "
              "that its client-side prompt token counts differ from the server's `usage`: the server counts the chat "
              "template's tokens too, as vLLM does. Errors are AIPerf's count of requests it could not use: a stream whose "
              "only content is the end of sequence (the model answered a synthetic prompt with EOS at once) counts as one."]
    if images:
        lines += ["", "AIPerf's plots (`aiperf plot` over each scheme's concurrency sweep):", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, doc.parent)})" for p in images]
    lines += ["", END]
    return "\n".join(lines)


def write_doc(doc: Path, body: str) -> None:
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if START in text and END in text:
        text = text[: text.index(START)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{body}\n"
    doc.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aiperf", default="aiperf", help="the aiperf executable")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--schemes", default="bdlora,slora,replicated")
    p.add_argument("--concurrency", default="1,4", help="AIPerf's concurrency sweep")
    p.add_argument("--requests", type=int, default=8, help="requests per concurrency")
    p.add_argument("--isl", type=int, default=64, help="synthetic prompt tokens")
    p.add_argument("--osl", type=int, default=16, help="max output tokens")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--output", default="/tmp/trtllm-bdlora-serve-bench", help="AIPerf artifacts and server logs")
    p.add_argument("--doc", default=str(REPO / "docs" / "performance.md"))
    p.add_argument("--no-doc", action="store_true", help="print the section instead of writing the doc")
    p.add_argument("--machine-note", default="", help="e.g. 'shared with other jobs during the run'")
    args = p.parse_args(argv)
    if shutil.which(args.aiperf) is None:
        p.error(f"{args.aiperf}: not found (pip install aiperf, or pass --aiperf PATH)")
    sys.path.insert(0, str(REPO))
    from trtllm_bdlora.llama.loader import resolve_model_dir

    tokenizer = str(resolve_model_dir(args.model))  # a local tokenizer: AIPerf needs no network
    version = subprocess.run([args.aiperf, "--version"], capture_output=True, text=True).stdout.strip()
    out, doc = Path(args.output), Path(args.doc)
    images_dir = doc.parent / "images" / "serve_bench"
    rows, images = [], []
    for scheme in args.schemes.split(","):
        run_scheme(args, scheme, out / scheme, tokenizer)
        rows += collect(out / scheme, scheme, args.concurrency)
        if not args.no_doc:
            images += plot(args, out / scheme, scheme, images_dir)
    command = "python benchmarks/serve_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = section(args, rows, images, doc, command, version)
    if args.no_doc:
        print(body)
    else:
        write_doc(doc, body)
        print(f"wrote {len(rows)} rows to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

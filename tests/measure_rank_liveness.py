"""What a client and a load balancer see when a worker rank of `serve --tp N` stops (SIGSTOP):

    python tests/measure_rank_liveness.py --model DIR [--tp 2] [--rank-timeout S] [--observe 60]

Starts serve (this checkout's), sends a long request, stops rank 1 once the request runs, sends a second request,
and for up to --observe seconds polls gRPC ServerReady, HTTP /v2/health/ready and OpenAI /health. Prints one
JSON line: seconds from the stop to the first "not ready" on each protocol, to each request's answer (and its
status), to serve's exit, and serve's last line. Without --rank-timeout the flag is not passed (a checkout before
issue 26 has none).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.serving_helpers import Server  # noqa: E402
from tests.test_triton_serve import core_inputs, tensors  # noqa: E402


def _infer(server, max_tokens: int) -> str:
    values = core_inputs([5, 9, 13, 17], max_tokens, 0, 0, exclude_input_in_output=np.array([[True]], bool))
    values.pop("end_id")
    values.pop("pad_id")
    try:
        grpcclient.InferenceServerClient(server.url).infer("tensorrt_llm", tensors(values), client_timeout=3600)
        return "served"
    except InferenceServerException as err:
        return f"{err.status()}: {err.message()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rank-timeout", type=float, default=None)
    parser.add_argument("--observe", type=float, default=60)
    args = parser.parse_args()
    extra = [] if args.rank_timeout is None else ["--rank-timeout", str(args.rank_timeout)]
    server = Server(Path(args.model), {}, tp=args.tp, extra=extra)
    out: dict = {"tp": args.tp, "rank_timeout": args.rank_timeout, "observed_s": args.observe}
    try:
        server.wait_ready()
        ranks = server.rank_pids()
        answers: dict = {}
        t0: list[float] = []

        def ask(name: str, max_tokens: int) -> None:
            result = _infer(server, max_tokens)
            answers[name] = (round(time.monotonic() - t0[0], 1) if t0 else None, result[:200])

        in_flight = threading.Thread(target=ask, args=("in_flight", 240), daemon=True)
        in_flight.start()
        time.sleep(1.0)
        os.kill(ranks[1], signal.SIGSTOP)
        t0.append(time.monotonic())
        threading.Thread(target=ask, args=("sent_after_stop", 8), daemon=True).start()
        health = server.openai_url.removesuffix("/v1") + "/health"
        probes = {"grpc": lambda: grpcclient.InferenceServerClient(server.url).is_server_ready(),
                  "http": lambda: requests.get(f"http://{server.http_url}/v2/health/ready", timeout=2).ok,
                  "openai": lambda: requests.get(health, timeout=2).ok}
        not_ready: dict = {}
        while time.monotonic() - t0[0] < args.observe and server.proc.poll() is None:
            for name, ready in probes.items():
                try:
                    if name not in not_ready and not ready():
                        not_ready[name] = round(time.monotonic() - t0[0], 1)
                except Exception:  # noqa: BLE001 - no answer is no "not ready"
                    pass
            time.sleep(0.2)
        if server.proc.poll() is None:
            try:
                server.proc.wait(30)
            except Exception:  # noqa: BLE001
                pass
        exited = server.proc.poll()
        out.update(not_ready_after_s=not_ready, answers=answers,
                   exit=None if exited is None else {"status": exited, "after_s": round(time.monotonic() - t0[0], 1),
                                                     "last_line": server.output().strip().splitlines()[-1]})
    finally:
        for pid in server.rank_pids().values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        server.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

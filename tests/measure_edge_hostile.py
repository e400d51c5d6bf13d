"""Probe a running `serve` as a hostile client (issue 29) and print one JSON object per probe: the figures of
docs/reliability.md "The edge under hostile clients", before and after. Works against servers without the edge
flags too (the `before`): the API key is sent anyway, and ignored there.

    python tests/measure_edge_hostile.py --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 --openai 127.0.0.1:9000 \
        --pid RANK0_PID --key KEY --adapter-root DIR --fault-adapter 7 [--idle 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def timed_get(url: str, timeout: float = 5.0) -> str:
    t0 = time.monotonic()
    try:
        status = requests.get(url, timeout=timeout).status_code
        return f"{status} in {(time.monotonic() - t0) * 1000:.0f} ms"
    except requests.RequestException as err:
        return f"no answer ({type(err).__name__}) after {time.monotonic() - t0:.1f} s"


def closed_after(sock: socket.socket, limit: float) -> str:
    """How long until the server closes `sock` (reading whatever it sends), up to `limit` seconds."""
    sock.settimeout(limit)
    t0, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return f"still open after {limit:g} s"
    except OSError:
        pass
    first = data.split(b"\r\n")[0].decode(errors="replace")
    return f"closed after {time.monotonic() - t0:.1f} s" + (f" ({first})" if data else "")


def probe_slow(args) -> dict:
    out = {}
    for name, hostport, path in (("kserve", args.http, "/v2/models/ensemble/generate"), ("openai", args.openai, "/v1/completions")):
        host, port = hostport.split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {args.key}\r\nContent-Length: 1000\r\n"
                     f"\r\n{{\"text".encode())
        out[f"{name} body declared 1000 bytes, 6 sent"] = closed_after(sock, args.wait)
        sock.close()
        sock = socket.create_connection((host, int(port)))
        out[f"{name} connection that sends nothing"] = closed_after(sock, args.wait)
        sock.close()
    return out


def probe_chat(args, headers) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": "a " * (10 * 1024 * 1024)}], "max_tokens": 4})
    worst, done = [0.0], threading.Event()

    def probe():
        while not done.is_set():
            t0 = time.monotonic()
            try:
                requests.get(f"http://{args.openai}/health", timeout=60)
            except requests.RequestException:
                pass
            worst[0] = max(worst[0], time.monotonic() - t0)
            time.sleep(0.05)

    thread = threading.Thread(target=probe)
    thread.start()
    t0 = time.monotonic()
    r = requests.post(f"http://{args.openai}/v1/chat/completions", data=body, timeout=600,
                      headers={**headers, "Content-Type": "application/json"})
    seconds = time.monotonic() - t0
    done.set()
    thread.join()
    return {"20 MB chat message": f"{r.status_code} after {seconds:.2f} s: {r.text[:160]}",
            "worst /health meanwhile": f"{worst[0] * 1000:.0f} ms"}


def probe_disconnect(args, headers) -> dict:
    out = {}
    for name, hostport, path, body in (
            ("kserve generate", args.http, "/v2/models/ensemble/generate",
             {"text_input": "Hello", "max_tokens": args.tokens, "end_id": 1, "parameters": {"id": "measure-gone"}}),
            ("openai completion", args.openai, "/v1/completions",
             {"prompt": "Hello", "max_tokens": args.tokens, "ignore_eos": True})):
        host, port = hostport.split(":")
        data = json.dumps(body).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(2)
        sock.close()
        out[name] = f"client left 2 s in, at {time.time():.3f} (compare the access line)"
        time.sleep(1)
    return out


def probe_flood(args, headers) -> dict:
    def one(_):
        t0 = time.monotonic()
        r = requests.post(f"http://{args.openai}/v1/completions", headers=headers, timeout=900,
                          json={"prompt": "Hello", "max_tokens": args.flood_tokens, "ignore_eos": True})
        return r.status_code, time.monotonic() - t0

    peak, done = [0.0], threading.Event()

    def watch():
        while not done.is_set():
            try:
                for line in requests.get(f"http://{args.metrics}/metrics", timeout=5).text.splitlines():
                    if 'request_type="waiting"' in line:
                        peak[0] = max(peak[0], float(line.rsplit(" ", 1)[1]))
            except requests.RequestException:
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    results = []
    with ThreadPoolExecutor(args.flood * 10) as pool:  # `args.flood` requests a second for 10 s, none waiting for another
        futures = []
        for _ in range(10):
            futures += [pool.submit(one, i) for i in range(args.flood)]  # noqa: B023
            time.sleep(1)
        results = [f.result() for f in futures]
    done.set()
    watcher.join()
    codes = [c for c, _ in results]
    return {f"{len(results)} OpenAI requests ({args.flood}/s for 10 s)": {str(c): codes.count(c) for c in sorted(set(codes))},
            "peak waiting (metrics)": peak[0], "slowest answer": f"{max(s for _, s in results):.1f} s"}


DEEP = "[" * 100_000 + "]" * 100_000


def probe_malformed(args, headers) -> dict:
    cases = {
        "text_input \\ud800 (generate)": (args.http, "/v2/models/ensemble/generate", '{"text_input": "\\ud800", "max_tokens": 2}'),
        "prompt \\ud800": (args.openai, "/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}'),
        "model \\ud800": (args.openai, "/v1/completions", '{"model": "\\ud800", "prompt": "hi", "max_tokens": 2}'),
        "message content \\ud800": (args.openai, "/v1/chat/completions",
                                    '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
        "lora_name \\ud800": (args.openai, "/v1/load_lora_adapter", '{"lora_name": "\\ud800", "lora_path": "a1"}'),
        "lora_path with NUL": (args.openai, "/v1/load_lora_adapter", '{"lora_name": "n", "lora_path": "a\\u0000"}'),
        "100,000-deep JSON (generate)": (args.http, "/v2/models/ensemble/generate", DEEP),
        "100,000-deep JSON (infer)": (args.http, "/v2/models/ensemble/infer", DEEP),
        "100,000-deep JSON (repository index)": (args.http, "/v2/repository/index", DEEP),
        "100,000-deep JSON (completions)": (args.openai, "/v1/completions", DEEP),
        "lora_task_id -1 (generate)": (args.http, "/v2/models/ensemble/generate",
                                       '{"text_input": "hi", "max_tokens": 2, "lora_task_id": -1}'),
    }
    out = {}
    for name, (hostport, path, body) in cases.items():
        r = requests.post(f"http://{hostport}{path}", data=body.encode(), timeout=60,
                          headers={**headers, "Content-Type": "application/json"})
        out[name] = f"{r.status_code} {r.text[:110]}"
    out["GET /v1/models afterwards"] = requests.get(f"http://{args.openai}/v1/models", headers=headers, timeout=10).status_code
    return out


def probe_paths(args, headers) -> dict:
    root = os.path.realpath(args.adapter_root)
    bodies = {
        "load, broken adapter (400)": requests.post(f"http://{args.openai}/v1/load_lora_adapter", headers=headers, timeout=60,
                                                    json={"lora_name": "b", "lora_path": "broken"}).text,
        "load, outside the root (403)": requests.post(f"http://{args.openai}/v1/load_lora_adapter", headers=headers,
                                                      timeout=60, json={"lora_name": "b", "lora_path": "/etc"}).text,
        "load, missing (404)": requests.post(f"http://{args.openai}/v1/load_lora_adapter", headers=headers, timeout=60,
                                             json={"lora_name": "b", "lora_path": "missing"}).text,
        "GET /v1/models": requests.get(f"http://{args.openai}/v1/models", headers=headers, timeout=10).text,
        "GET tensorrt_llm config": requests.get(f"http://{args.http}/v2/models/tensorrt_llm/config", headers=headers,
                                                timeout=10).text,
        "internal error (OpenAI)": requests.post(f"http://{args.openai}/v1/completions", headers=headers, timeout=60, json={
            "model": str(args.fault_adapter), "prompt": "Hello", "max_tokens": 4}).text,
        "internal error (KServe)": requests.post(f"http://{args.http}/v2/models/ensemble/generate", headers=headers,
                                                 timeout=60, json={"text_input": "Hello", "max_tokens": 4,
                                                                   "lora_task_id": args.fault_adapter}).text,
    }
    model_dir = os.path.realpath(args.model_dir) if args.model_dir else None
    return {name: {"adapter root shown": root in body, "model path shown": bool(model_dir and model_dir in body),
                   "exception name shown": any(n in body for n in ("RuntimeError", "Traceback", "Error: ")),
                   "body": body[:200]} for name, body in bodies.items()}


def probe_auth(args) -> dict:
    return {"no key": requests.post(f"http://{args.openai}/v1/completions", timeout=60,
                                    json={"prompt": "Hi", "max_tokens": 1}).status_code,
            "wrong key": requests.post(f"http://{args.openai}/v1/completions", timeout=60, headers={"Authorization": "Bearer x"},
                                       json={"prompt": "Hi", "max_tokens": 1}).status_code,
            "OPTIONS preflight": requests.options(f"http://{args.openai}/v1/completions", timeout=10, headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST"}).status_code}


def probe_idle(args) -> dict:
    before = fds(args.pid)
    idle = []
    t0 = time.monotonic()
    try:
        for hostport in (args.http, args.openai, args.grpc):
            host, port = hostport.split(":")
            for _ in range(args.idle):
                idle.append(socket.create_connection((host, int(port)), timeout=5))
    except OSError as err:
        print(json.dumps({"idle": f"stopped opening at {len(idle)}: {err}"}))
    opened = time.monotonic() - t0
    time.sleep(1)
    out = {"idle connections opened": f"{len(idle)} in {opened:.1f} s", "rank 0 fds": f"{before} -> {fds(args.pid)}",
           "/v2/health/ready": timed_get(f"http://{args.http}/v2/health/ready"),
           "OpenAI /health": timed_get(f"http://{args.openai}/health"),
           "metrics": timed_get(f"http://{args.metrics}/metrics")}
    time.sleep(args.wait)
    alive = 0
    for s in idle:
        s.setblocking(False)
        try:
            while s.recv(65536):  # a 408, or gRPC's SETTINGS frame, before the end
                pass
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        s.close()
    out[f"still open after {args.wait:g} s more"] = alive
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--http", required=True)
    p.add_argument("--grpc", required=True)
    p.add_argument("--openai", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--pid", type=int, required=True, help="rank 0's pid (file descriptors)")
    p.add_argument("--key", default="unused")
    p.add_argument("--adapter-root", required=True)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--fault-adapter", type=int, default=7)
    p.add_argument("--idle", type=int, default=1000, help="idle connections per port (last probe)")
    p.add_argument("--wait", type=float, default=70.0, help="seconds to wait for the server to drop a slow client")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--flood", type=int, default=6, help="OpenAI requests a second, for 10 s")
    p.add_argument("--flood-tokens", type=int, default=200)
    p.add_argument("--only", default="auth,malformed,paths,chat,disconnect,flood,slow,idle")
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"}
    probes = {"auth": lambda: probe_auth(args), "malformed": lambda: probe_malformed(args, headers),
              "paths": lambda: probe_paths(args, headers), "chat": lambda: probe_chat(args, headers),
              "disconnect": lambda: probe_disconnect(args, headers), "flood": lambda: probe_flood(args, headers),
              "slow": lambda: probe_slow(args), "idle": lambda: probe_idle(args)}
    for name in args.only.split(","):
        print(json.dumps({"probe": name, "load": open("/proc/loadavg").read().split()[:3], **probes[name]()}), flush=True)


if __name__ == "__main__":
    main()

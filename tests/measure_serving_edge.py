"""Probe a running `serve` from outside for docs/reliability.md (edge items of issues 12 and 17): liveness with N
idle streams, a flood beyond --max-queue (outcomes, refusal latency, RSS of the ranks), the status of malformed or
non-UTF-8 tensors and non-finite sampling values, and whether re-sent weights for a registered id are refused.

    python tests/measure_serving_edge.py --url 127.0.0.1:8001 --http-url 127.0.0.1:8000 --model MODEL [--pids P0,P1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reliability_helpers import rss_bytes  # noqa: E402
from tests.serving_helpers import DecoupledAware  # noqa: E402 - decoupled models answer streams, as in Triton
from tests.test_adapter_cache import random_request_adapter  # noqa: E402
from tests.test_bad_input_kserve import bytes_tensor, raw_request  # noqa: E402
from tests.test_serving_edge import IdleStream  # noqa: E402
from tests.test_triton_serve import ensemble_inputs, tensors  # noqa: E402
from trtllm_bdlora.llama.loader import load_model_config  # noqa: E402


def _outcome(fn):
    t0 = time.monotonic()
    try:
        fn()
        return "OK", time.monotonic() - t0
    except InferenceServerException as err:
        return f"{err.status()}: {str(err.message())[:90]}", time.monotonic() - t0
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()[:90]}", time.monotonic() - t0


def liveness(url: str, streams: int) -> dict:
    channels = [grpc.insecure_channel(url) for _ in range(4)]
    open_streams = [IdleStream(pb_grpc.GRPCInferenceServiceStub(channels[i % 4])) for i in range(streams)]
    time.sleep(2)
    client = DecoupledAware(grpcclient.InferenceServerClient(url), url=url)
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        try:
            client.is_server_live(client_timeout=10)
            times.append(time.monotonic() - t0)
        except InferenceServerException:
            times.append(float("inf"))
    refused = sum(1 for s in open_streams if s.error)
    for s in open_streams:
        s.close()
    for c in channels:
        c.close()
    return {"idle_streams": streams, "is_server_live_s": [round(t, 3) for t in times],
            "streams_refused": refused}


def flood(url: str, n: int, max_tokens: int, pids: list[int]) -> dict:
    def one(_):
        client = DecoupledAware(grpcclient.InferenceServerClient(url), url=url)
        try:
            return _outcome(lambda: client.infer("ensemble", tensors(ensemble_inputs("Hello there", max_tokens)),
                                                 client_timeout=600))
        finally:
            client.close()

    before = [rss_bytes(p) for p in pids]
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.monotonic() - t0
    after = [rss_bytes(p) for p in pids]
    refused = [t for o, t in results if o != "OK"]
    return {"requests": n, "outcomes": dict(Counter(o for o, _ in results)), "wall_s": round(wall, 1),
            "slowest_refusal_s": round(max(refused), 3) if refused else None,
            "rss_mib_before_after": [[round(b / 2**20, 1), round(a / 2**20, 1)] for b, a in zip(before, after)]}


def bad_inputs(url: str, http_url: str) -> dict:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))
    client = DecoupledAware(grpcclient.InferenceServerClient(url), url=url)
    two = np.int32(2).tobytes()
    cases = {  # to preprocessing: Triton answers unary calls to non-decoupled models only
        "raw INT32 of 2 bytes": [("QUERY", "BYTES", [1, 1], bytes_tensor(b"Hi")),
                                 ("REQUEST_OUTPUT_LEN", "INT32", [1, 1], b"\1\0")],
        "BYTES length past the end": [("QUERY", "BYTES", [1, 1], b"\x40\0\0\0Hi"), ("REQUEST_OUTPUT_LEN", "INT32", [1, 1], two)],
        "non-UTF-8 QUERY": [("QUERY", "BYTES", [1, 1], bytes_tensor(b"caf\xe9")), ("REQUEST_OUTPUT_LEN", "INT32", [1, 1], two)],
    }
    out = {f"gRPC {k}": _outcome(lambda v=v: stub.ModelInfer(raw_request("preprocessing", v), timeout=60))[0]
           for k, v in cases.items()}
    for name, value in (("temperature", np.nan), ("temperature", np.inf), ("top_p", np.nan)):
        values = {**ensemble_inputs("Hello", 2), name: np.array([[value]], np.float32)}
        out[f"gRPC {name}={value}"] = _outcome(lambda v=values: client.infer("ensemble", tensors(v)))[0]
    out["then a correct request"] = _outcome(lambda: client.infer("ensemble", tensors(ensemble_inputs("Hello", 2))))[0]
    head = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                                  for n, d, s, b in cases["raw INT32 of 2 bytes"]]}).encode()
    r = requests.post(f"http://{http_url}/v2/models/preprocessing/infer", timeout=60,
                      data=head + b"".join(b for *_, b in cases["raw INT32 of 2 bytes"]),
                      headers={"Inference-Header-Content-Length": str(len(head))})
    out["HTTP raw INT32 of 2 bytes"] = f"{r.status_code}: {r.text[:90]}"
    return out


def ownership(url: str, model: str) -> dict:
    shape = load_model_config(model)
    client = DecoupledAware(grpcclient.InferenceServerClient(url), url=url)
    first, config = random_request_adapter(shape, 8, 1)
    other, _ = random_request_adapter(shape, 8, 2)

    def text(task, weights=None):
        values = {**ensemble_inputs("Hello there", 6), "lora_task_id": np.array([[task]], np.uint64)}
        if weights is not None:
            values.update(lora_weights=weights, lora_config=config)
        return client.infer("ensemble", tensors(values)).as_numpy("text_output").reshape(-1)[0]

    owned, other_text = text(9001, first), text(9002, other)
    outcome = _outcome(lambda: text(9001, other))
    return {"id 9001 re-sent with other weights": outcome[0],
            "answer then": "first adapter's" if text(9001) == owned else "other",
            "adapters differ": owned != other_text}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--http-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--pids", default="")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--flood", type=int, default=100)
    args = p.parse_args()
    pids = [int(x) for x in args.pids.split(",") if x]
    report = {"liveness": liveness(args.url, args.streams), "bad_inputs": bad_inputs(args.url, args.http_url),
              "ownership": ownership(args.url, args.model)}
    report["flood"] = [flood(args.url, args.flood, 32, pids) for _ in range(2)]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

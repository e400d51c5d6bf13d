"""Register N random adapters through requests on a running `serve` and print each rank's RSS before and after.

    python tests/measure_adapter_rss.py --url 127.0.0.1:8001 --model MODEL_DIR --count 48 [--rank 64] [--rounds 2]

Each request carries its own `lora_task_id` with `lora_weights` / `lora_config` (fp16, every module of every layer,
random values) and asks for 2 tokens. Ranks are found by the server's gRPC port on their command line. The figures
in docs/reliability.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import time

import tritonclient.grpc as grpcclient

from tests.reliability_helpers import rank_processes, rss_bytes
from tests.test_adapter_cache import random_request_adapter
from trtllm_bdlora.cli.client import infer
from trtllm_bdlora.llama.loader import load_model_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--count", type=int, default=48)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--first-id", type=int, default=1000)
    args = p.parse_args()
    shape = load_model_config(args.model)
    client = grpcclient.InferenceServerClient(args.url)
    port = args.url.rsplit(":", 1)[1].encode()
    ranks = rank_processes(lambda cmd, env: b"serve" in cmd and port in cmd)
    infer(client, "Hello", 2)
    time.sleep(2.5)  # an idle heartbeat: the ranks hand freed memory back first
    rss = [{r: rss_bytes(pid) for r, pid in ranks.items()}]
    errors, next_id, t0 = 0, args.first_id, time.time()
    for _ in range(args.rounds):
        for _ in range(args.count):
            weights, config = random_request_adapter(shape, args.rank, next_id)
            try:
                infer(client, "Hello", 2, next_id, (weights, config))
            except Exception as err:  # noqa: BLE001 - counted
                errors += 1
                print("error:", str(err)[:200])
            next_id += 1
        time.sleep(2.5)
        rss.append({r: rss_bytes(pid) for r, pid in ranks.items()})
    print(json.dumps({
        "adapters_registered": args.count * args.rounds, "request_bytes": int(weights.nbytes), "errors": errors,
        "seconds": round(time.time() - t0, 1),
        "rss_mib_per_rank": {r: [round(x[r] / 2**20, 1) for x in rss] for r in sorted(ranks)},
    }))


if __name__ == "__main__":
    main()

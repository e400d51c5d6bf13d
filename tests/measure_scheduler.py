"""Serving-side figures of docs/reliability.md against a running `serve` (any version): a short request after 16
abandoned long ones, a short request during four long prefills, a 20 MiB text_input, a request whose adapter
makes its logits non-finite. Prints one JSON object per scenario.

    python tests/measure_scheduler.py --url 127.0.0.1:PORT --model MODEL_DIR [--wait 300]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.serving_helpers import DecoupledAware  # the decoupled models answer streams, as in Triton
from tests.test_adapter_cache import random_request_adapter
from tests.test_serving_scheduler_serve import _tensors, core, random_ids
from trtllm_bdlora.llama.loader import load_model_config


def timed(call) -> tuple[float, str]:
    started = time.monotonic()
    try:
        call()
        return time.monotonic() - started, "ok"
    except InferenceServerException as err:
        return time.monotonic() - started, str(err).splitlines()[0][:200]


def parallel(calls) -> None:
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def abandoned(url: str, wait: float) -> dict:
    client = DecoupledAware(grpcclient.InferenceServerClient(url), url=url)
    short = core(random_ids(8, 1), 4)
    alone, _ = timed(lambda: client.infer("tensorrt_llm", short))
    parallel([lambda i=i: timed(lambda: client.infer("tensorrt_llm", core(random_ids(16, i), 3000),
                                                     client_timeout=2.0)) for i in range(16)])
    after, outcome = timed(lambda: client.infer("tensorrt_llm", short, client_timeout=wait))
    return {"scenario": "short after 16 abandoned", "alone_s": round(alone, 2), "after_s": round(after, 2),
            "outcome": outcome}


def long_prefills(url: str, wait: float) -> dict:
    client = DecoupledAware(grpcclient.InferenceServerClient(url), url=url)
    done = []
    start = time.monotonic()
    longs = [threading.Thread(target=lambda i=i: (client.infer("tensorrt_llm", core(random_ids(3000, 100 + i), 3),
                                                               client_timeout=wait), done.append(time.monotonic())))
             for i in range(4)]
    for t in longs:
        t.start()
    time.sleep(0.5)
    short, outcome = timed(lambda: client.infer("tensorrt_llm", core(random_ids(8, 1), 4), client_timeout=wait))
    for t in longs:
        t.join()
    return {"scenario": "short during 4 x 3000-token prefills", "short_s": round(short, 2), "outcome": outcome,
            "long_done_s": [round(d - start, 2) for d in sorted(done)]}


def big_text(url: str) -> dict:
    client = DecoupledAware(grpcclient.InferenceServerClient(url), url=url)
    values = {"text_input": np.array([[("word " * (4 << 20)).encode()]], dtype=object),
              "max_tokens": np.array([[4]], np.int32)}
    took, outcome = timed(lambda: client.infer("ensemble", _tensors(values)))
    return {"scenario": "20 MiB text_input", "refused_after_s": round(took, 2), "outcome": outcome}


def faulty_adapter(url: str, model: str) -> dict:
    client = DecoupledAware(grpcclient.InferenceServerClient(url), url=url)
    weights, config = random_request_adapter(load_model_config(model), 8, 5)
    bad = core(random_ids(10, 2), 8, lora_task_id=np.array([[11]], np.uint64), lora_weights=weights * 1e30,
               lora_config=config, runtime_top_k=np.array([[5]], np.int32))
    _, outcome = timed(lambda: client.infer("tensorrt_llm", bad, client_timeout=60))
    _, after = timed(lambda: client.infer("tensorrt_llm", core(random_ids(8, 1), 4), client_timeout=60))
    return {"scenario": "adapter making logits non-finite, sampled", "outcome": outcome, "next_request": after}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--wait", type=float, default=300, help="give up on a request after this many seconds")
    args = p.parse_args()
    for result in (abandoned(args.url, args.wait), long_prefills(args.url, args.wait), big_text(args.url),
                   faulty_adapter(args.url, args.model)):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

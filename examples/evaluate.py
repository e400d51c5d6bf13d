"""Exact-match accuracy of the shipped BD-LoRA adapters on held-out prompts, through our serving path
(`trtllm-bdlora generate`, TP 1 and 3) and through PEFT directly, next to the base model's.

  python examples/evaluate.py [--n 20] [--tp 1 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from tasks import TASKS, examples, messages  # noqa: E402

ADAPTERS = {i + 1: (task, HERE / "adapters" / task) for i, task in enumerate(TASKS)}
MAX_TOKENS = 24


def requests_for(n: int) -> list[dict]:
    """Each task's held-out prompts, once with its adapter and once on the base model."""
    out = []
    for task_id, (task, _) in ADAPTERS.items():
        for prompt, answer in examples(task, "heldout", n):
            for adapter in (task_id, None):
                out.append({"id": len(out), "adapter": adapter, "messages": messages(prompt), "max_tokens": MAX_TOKENS,
                            "task": task, "answer": answer})
    return out


def run_generate(requests: list[dict], tp: int) -> list[dict]:
    argv = [sys.executable, "-m", "trtllm_bdlora", "generate", "--model", "smollm2-135m", "--tp", str(tp),
            "--max-batch-size", "32", "--requests", "-"]
    for task_id, (_, directory) in ADAPTERS.items():
        argv += ["--adapter", f"{task_id}={directory}"]
    payload = "\n".join(json.dumps({k: r[k] for k in ("id", "adapter", "messages", "max_tokens")}) for r in requests)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(argv, input=payload + "\n", capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def peft_outputs(requests: list[dict]) -> list[list[int]]:
    """Greedy token ids from PEFT's PeftModel (the independent reference), one request at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtllm_bdlora.models.loader import embedded_model_dir

    base_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    first = next(iter(ADAPTERS))
    model = PeftModel.from_pretrained(model, ADAPTERS[first][1], adapter_name=str(first))
    for task_id, (_, directory) in ADAPTERS.items():
        if task_id != first:
            model.load_adapter(directory, adapter_name=str(task_id))
    model.eval()
    outs = []
    for r in requests:
        text = tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        kwargs = dict(max_new_tokens=r["max_tokens"], do_sample=False, eos_token_id=model.config.eos_token_id)
        with torch.no_grad():
            if r["adapter"] is None:
                with model.disable_adapter():
                    gen = model.generate(ids, **kwargs)
            else:
                model.set_adapter(str(r["adapter"]))
                gen = model.generate(ids, **kwargs)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


def accuracy(requests: list[dict], texts: list[str]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, list[bool]]] = {}
    for r, text in zip(requests, texts):
        column = "adapter" if r["adapter"] else "base"
        table.setdefault(r["task"], {}).setdefault(column, []).append(text.strip() == r["answer"])
    return {task: {col: sum(v) / len(v) for col, v in cols.items()} for task, cols in table.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="held-out prompts per task")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    p.add_argument("--no-peft", action="store_true")
    args = p.parse_args(argv)
    requests = requests_for(args.n)
    results = {}
    for tp in args.tp:
        outs = run_generate(requests, tp)
        results[f"generate tp{tp}"] = accuracy(requests, [o["text"] for o in outs])
    if not args.no_peft:
        from transformers import AutoTokenizer

        from trtllm_bdlora.models.loader import embedded_model_dir

        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in peft_outputs(requests)]
        results["peft"] = accuracy(requests, texts)
    print(f"exact match on {args.n} held-out prompts per task (adapter / base model)")
    print(f"{'path':<16}" + "".join(f"{t:>18}" for t in TASKS))
    for path, acc in results.items():
        print(f"{path:<16}" + "".join(f"{acc[t]['adapter']:>9.0%} / {acc[t]['base']:<6.0%}" for t in TASKS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

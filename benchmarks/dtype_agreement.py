"""Greedy exact-match rates of the engine in float32, bfloat16 and float16 against PEFT in float32.

smollm2-135m (dequantised) with the four plain LoRA adapters of `peer_cpu.py` and the three BD-LoRA example
adapters; each prompt runs on the base model and on every adapter, greedy, up to the end of sequence or 32 new
tokens (both stop at EOS). A sequence matches when all its tokens equal PEFT's; `tokens` counts the tokens
before the first difference. Also the relative L2 error of the prompt logits against PEFT's.

  python benchmarks/dtype_agreement.py --out docs/perf/dtype_agreement.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.peer_cpu import CHECK_PROMPTS, make_adapters  # noqa: E402

PROMPTS = CHECK_PROMPTS + ["Translate to French: good morning", "List three fruits:"]


def peft_reference(model_dir: str, adapters: dict[str, Path], prompt_ids: list[list[int]], new_tokens: int) -> dict:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    names = list(adapters)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    ref = {}
    with torch.no_grad():
        for name in [None, *names]:
            for i, ids in enumerate(prompt_ids):
                x = torch.tensor([ids])
                if name is None:
                    with model.disable_adapter():
                        logits = model(x).logits[0]
                        gen = model.generate(x, max_new_tokens=new_tokens, do_sample=False)
                else:
                    model.set_adapter(name)
                    logits = model(x).logits[0]
                    gen = model.generate(x, max_new_tokens=new_tokens, do_sample=False)
                ref[(name, i)] = (logits, gen[0, len(ids):].tolist())
    return ref


def engine_outputs(model_dir: str, adapters: dict[str, Path], prompt_ids, new_tokens: int, dtype: str) -> dict:
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine
    from trtllm_bdlora.engine.generate import run_requests
    from trtllm_bdlora.engine.plan import SeqChunk, StepPlan

    task = {name: i + 1 for i, name in enumerate(adapters)}
    engine = Engine(Comm(0, 1, torch.device("cpu")), model_dir, "replicated", [(task[n], str(d)) for n, d in adapters.items()],
                    max_loras=len(adapters), dtype=dtype)
    out = {}
    for name in [None, *adapters]:
        loads, slots = engine.pool.assign([task.get(name)] * len(prompt_ids))
        chunks = [SeqChunk(i, ids, 0, s) for i, (ids, s) in enumerate(zip(prompt_ids, slots))]
        logits = engine.lead(StepPlan(loads=loads, chunks=chunks, all_logits=True))
        engine.lead(StepPlan(free=list(range(len(prompt_ids)))))
        lines = [json.dumps({"id": i, "adapter": task.get(name), "prompt_ids": ids, "max_tokens": new_tokens})
                 for i, ids in enumerate(prompt_ids)]
        results = run_requests(engine, lines, max_batch_size=16)
        for i, (part, res) in enumerate(zip(logits.split([len(p) for p in prompt_ids]), results)):
            out[(name, i)] = (part, res["output_ids"])
    return out


def main() -> int:
    from transformers import AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir

    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--adapters-dir", type=Path, default=Path("/tmp/peer_cpu/adapters"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model_dir = str(embedded_model_dir())
    adapters = dict(make_adapters(model_dir, args.adapters_dir))
    adapters |= {name: REPO / "examples" / "adapters" / name for name in ("upper", "reverse", "json")}
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tok(text)["input_ids"] for text in PROMPTS]
    ref = peft_reference(model_dir, adapters, prompt_ids, args.new_tokens)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": "smollm2-135m",
              "prompts": len(PROMPTS), "adapters": list(adapters), "new_tokens": args.new_tokens, "dtypes": {}}
    for dtype in args.dtypes.split(","):
        got = engine_outputs(model_dir, adapters, prompt_ids, args.new_tokens, dtype)
        seqs = tokens = errors = 0
        worst = 0.0
        for key, (want_logits, want_tokens) in ref.items():
            logits, out = got[key]
            seqs += out == want_tokens
            tokens += next((i for i, (a, b) in enumerate(zip(out, want_tokens)) if a != b), len(want_tokens))
            err = float((logits - want_logits).norm() / want_logits.norm())
            worst = max(worst, err)
            errors += err
        n = len(ref)
        report["dtypes"][dtype] = {"sequences_equal": seqs, "sequences": n, "tokens_before_first_difference": tokens,
                                   "tokens": n * args.new_tokens, "logits_rel_l2_mean": errors / n,
                                   "logits_rel_l2_max": worst}
        print(dtype, report["dtypes"][dtype], flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

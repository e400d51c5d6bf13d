"""Fine-tune a BD-LoRA adapter on smollm2-135m with Hugging Face PEFT, on the CPU, in minutes.

Column modules (q, k, v, gate, up) get a block-diagonal B, row modules (o, down) a block-diagonal A,
with nblocks 3: the adapter serves at TP 1 and TP 3 without LoRA communication.

  python examples/train_bdlora.py --task upper --output examples/adapters/upper
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import TASKS, examples, messages  # noqa: E402

from trtllm_bdlora.models.loader import embedded_model_dir  # noqa: E402

COLUMN = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
ROW = ["o_proj", "down_proj"]


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-formatted prompt + answer + end-of-turn; labels only on the answer."""
    text = tokenizer.apply_chat_template(messages(prompt), add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def batches(data, tokenizer, batch_size: int, gen: torch.Generator):
    while True:
        order = torch.randperm(len(data), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            encoded = [encode(tokenizer, *data[j]) for j in order[i : i + batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in encoded])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in encoded])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in encoded])
            yield ids, labels, mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=12)
    p.add_argument("--nblocks", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-examples", type=int, default=2000)
    args = p.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import BdLoraConfig
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    base_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=COLUMN + ROW,
        use_bdlora=BdLoraConfig(target_modules_bd_a=ROW, target_modules_bd_b=COLUMN, nblocks=args.nblocks),
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    data = examples(args.task, "train", args.train_examples, args.seed)
    optim = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / args.steps))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    for step, (ids, labels, mask) in zip(range(args.steps), batches(data, tokenizer, args.batch_size, gen)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    elapsed = time.time() - start

    out = Path(args.output)
    model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
    config_path = out / "adapter_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["base_model_name_or_path"] = "smollm2-135m"
    config_path.write_text(json.dumps(cfg, indent=2))
    command = "python examples/train_bdlora.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "README.md").write_text(
        f"# {args.task}\n\nBD-LoRA adapter for smollm2-135m (rank {args.rank}, nblocks {args.nblocks}), task `{args.task}` "
        f"(examples/tasks.py). Trained with `{command}`: seed {args.seed}, {args.steps} steps of batch {args.batch_size}, "
        f"{elapsed / 60:.1f} min on {os.cpu_count()} CPU cores, final loss {loss.item():.4f}; saved as float16.\n"
    )
    print(f"saved {out} in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

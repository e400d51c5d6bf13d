"""The embedded default model answers a chat prompt exactly as Hugging Face generate does, at TP 1 and 3."""

import json

import pytest
import torch

from tests.helpers import run_cli

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def hf_answer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtllm_bdlora.llama.loader import embedded_model_dir

    directory = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    return out[0, ids.shape[1]:].tolist(), tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_chat_matches_hf(tp, hf_answer):
    request = {"id": "chat", "adapter": None, "messages": MESSAGES, "max_tokens": 20}
    res = run_cli("generate", "--model", "smollm2-135m", "--tp", str(tp), "--requests", "-",
                  stdin=json.dumps(request) + "\n")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    want_ids, want_text = hf_answer
    assert out["output_ids"] == want_ids
    assert out["text"] == want_text and "Paris" in want_text

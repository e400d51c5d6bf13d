"""The shipped example adapters through `/v1/chat/completions` of `serve` on smollm2-135m, addressed by name
(`--adapter upper:1=DIR`): on the held-out prompts of examples/evaluate.py each adapter scores >= 90% exact match
(those below it as measured are strict expected failures, tests/test_example_adapters.py BELOW_FLOOR),
the bar evaluate.py's accuracy through `generate` meets (tests/test_example_adapters.py), and the base model, asked
the first few of them, scores <= 20% (its full comparison with PEFT is in that test too)."""

import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.helpers import REPO
from tests.serving_helpers import Server, warm_openai_client
from tests.test_example_adapters import BELOW_FLOOR, FLOOR

sys.path.insert(0, str(REPO / "examples"))
import evaluate  # noqa: E402
from tasks import TASKS  # noqa: E402

N = 20
N_BASE = 5
BASE = "smollm2-135m"


@pytest.fixture(scope="module")
def served():
    adapters = {f"{task}:{task_id}": directory for task_id, (task, directory) in evaluate.ADAPTERS.items()}
    server = Server(BASE, adapters, tp=1, max_loras=len(adapters), extra=["--max-batch-size", "64"])
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        assert server.stop() == 0, server.output()[-3000:]


@pytest.fixture(scope="module")
def chat_accuracy(served):
    client = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0, timeout=600)
    assert {c.id for c in client.models.list().data} == {BASE, *TASKS}
    requests = [r for r in evaluate.requests_for(N, ("chat",)) if r["adapter"]]
    requests += [r for r in evaluate.requests_for(N_BASE, ("chat",)) if not r["adapter"]]
    warm_openai_client(client, BASE)

    def ask(r):
        reply = client.chat.completions.create(model=r["task"] if r["adapter"] else BASE, messages=r["messages"],
                                               max_tokens=r["max_tokens"], temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(requests)) as pool:
        texts = list(pool.map(ask, requests))
    return evaluate.accuracy(requests, texts)


@pytest.mark.parametrize("task", [
    pytest.param(t, marks=pytest.mark.xfail(strict=True, reason=f"measured {BELOW_FLOOR[t, 'chat']} < the 90% floor: issue 28 open"))
    if (t, "chat") in BELOW_FLOOR else t for t in TASKS])
def test_example_adapters_reach_the_floor_through_chat(chat_accuracy, task):
    assert chat_accuracy[task, "chat"]["adapter"] >= FLOOR, (task, chat_accuracy)


def test_the_base_model_fails_every_task_through_chat(chat_accuracy):
    for task in TASKS:
        assert chat_accuracy[task, "chat"]["base"] <= 0.20, (task, chat_accuracy)


def test_adapter_loading_is_off_by_default(served):
    client = openai.OpenAI(base_url=served.openai_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="--allow-adapter-loading"):
        client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "/tmp"}, cast_to=str)

import pytest

from tests.helpers import make_peft_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def bd_adapters(tiny_llama, tmp_path_factory):
    """Three BD-LoRA adapters (nblocks 8) of different ranks, made with real PEFT."""
    root = tmp_path_factory.mktemp("bd")
    return [make_peft_adapter(tiny_llama, root / f"a{i}", seed=10 + i, r=r) for i, r in enumerate((16, 8, 32))]


@pytest.fixture(scope="session")
def lora_adapter(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "plain", seed=99, r=12, nblocks=None)


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(tmp_path_factory):
    """A random Llama carrying smollm2's tokenizer (vocabulary 49152)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_tok") / "model", tokenizer=True)


@pytest.fixture(scope="session")
def triton_served(tiny_llama_with_tokenizer, tmp_path_factory):
    """One `serve --tp 2` (tiny random Llama with smollm2's tokenizer) shared by the serving tests: adapters 1-3
    registered from PEFT directories, 4 left for first-use registration, 2 slots per rank."""
    from tests.serving_helpers import Server

    root = tmp_path_factory.mktemp("serve")
    model = tiny_llama_with_tokenizer
    adapters = {i + 1: make_peft_adapter(model, root / f"a{i + 1}", seed=30 + i, r=16) for i in range(4)}
    server = Server(model, {t: adapters[t] for t in (1, 2, 3)}, tp=2, max_loras=2)
    try:
        server.wait_ready()
        yield server, model, adapters
    finally:
        assert server.stop() == 0, server.output()[-3000:]

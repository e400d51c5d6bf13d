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

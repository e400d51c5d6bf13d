"""Adapter-id ownership in one process (TP 1): digests independent of the float type, start-up ids immutable
except for their own converted form, bindings that outlive eviction, and --no-allow-request-adapters."""

import numpy as np
import pytest

from tests.test_adapter_cache import UPSTREAM_NOT_CACHED, random_request_adapter
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.trtllm_format import convert_adapter, to_storage
from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.engine.adapter_registry import AdapterRegistry, adapter_digest
from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.errors import AdapterNotCachedError, RequestError
from trtllm_bdlora.llama.loader import load_model_config


@pytest.fixture(scope="module")
def shape(tiny_llama):
    return load_model_config(str(tiny_llama))


def test_digest_depends_on_values_not_on_their_float_type(shape):
    import torch

    weights, config = random_request_adapter(shape, 8, 3, dtype=np.float16)
    as32 = weights.astype(np.float32)
    as_bf16_bits = to_storage(torch.from_numpy(as32), "bfloat16")  # bf16 as TensorRT-LLM stores it (V2)
    assert adapter_digest(weights, config) == adapter_digest(as32, config) == adapter_digest(as32[0], config[0])
    rounded = torch.from_numpy(as32).to(torch.bfloat16).float().numpy()
    assert adapter_digest(as_bf16_bits, config) == adapter_digest(rounded, config)
    changed = as32.copy()
    changed[0, 0, 0] += 1e-3
    assert adapter_digest(changed, config) != adapter_digest(as32, config)
    moved = config.copy()
    moved[0, 0, 1] = 1  # same weights under another layer
    assert adapter_digest(as32, moved) != adapter_digest(as32, config)


def test_engine_refuses_other_weights_for_a_registered_id(tiny_llama, bd_adapters, shape):
    engine = Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(bd_adapters[0]))], max_loras=2,
                    lora_cache_host_bytes=1 << 30)
    first, other = random_request_adapter(shape, 8, 20), random_request_adapter(shape, 8, 21)
    engine.admit_adapter(20, *first)
    engine.admit_adapter(20, *first)  # the same again: fine
    with pytest.raises(RequestError, match="lora_task_id 20 is registered with different lora_weights"):
        engine.admit_adapter(20, *other)
    engine.pool.evict([20])  # evicted: the id still means `first`
    with pytest.raises(AdapterNotCachedError):
        engine.admit_adapter(20)
    with pytest.raises(RequestError, match="different lora_weights"):
        engine.admit_adapter(20, *other)
    engine.admit_adapter(20, *first)
    assert 20 in engine.pool
    with pytest.raises(RequestError, match="registered at start-up"):
        engine.admit_adapter(1, *other)
    own = convert_adapter(load_peft_adapter(bd_adapters[0]), tp=1, dtype="bfloat16")
    engine.admit_adapter(1, *own)  # its own converted form is accepted


def test_request_registration_can_be_turned_off(tiny_llama, bd_adapters, shape):
    engine = Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(bd_adapters[0]))], max_loras=2,
                    allow_request_adapters=False)
    with pytest.raises(RequestError, match="--no-allow-request-adapters"):
        engine.admit_adapter(30, *random_request_adapter(shape, 8, 30))
    assert 30 not in engine.pool
    with pytest.raises(AdapterNotCachedError, match=UPSTREAM_NOT_CACHED.format(30)):
        engine.admit_adapter(30)
    engine.admit_adapter(1)  # start-up ids serve as before


def test_bindings_beyond_the_limit_forget_only_ids_not_cached():
    registry = AdapterRegistry(remembered=2)
    for task in (1, 2, 3):
        registry.bind_request(task, bytes([task]), resident={1})
    assert list(registry.bindings) == [1, 3]  # 2 was the oldest binding not in the cache

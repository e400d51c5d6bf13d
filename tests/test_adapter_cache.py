"""The bounded host LoRA cache, the rank cap and adapter validation, in one process (TP 1)."""

import json
import math

import numpy as np
import pytest
import torch

from tests.helpers import make_peft_adapter, rewrite_config
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm, convert_adapter
from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
from trtllm_bdlora.errors import AdapterCacheFullError, AdapterError, AdapterNotCachedError, RequestError
from trtllm_bdlora.llama.loader import load_model_config

UPSTREAM_NOT_CACHED = "LoRA task {} not found in cache. Please send LoRA weights with request"


def random_request_adapter(shape, rank: int, seed: int, layers=None, dtype=np.float16):
    """lora_weights [1, rows, width] / lora_config [1, rows, 3] with random non-zero values, every module."""
    gen = np.random.default_rng(seed)
    rows, config = [], []
    for layer in range(shape.num_layers) if layers is None else layers:
        for module_id, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"), 1):
            inp, out = shape.module_dims(name)
            rows.append(gen.standard_normal(rank * (inp + out)) * 0.05)
            config.append([module_id, layer, rank])
    weights = np.zeros((1, len(rows), max(len(r) for r in rows)), dtype=dtype)
    for i, row in enumerate(rows):
        weights[0, i, : len(row)] = row
    return weights, np.asarray([config], dtype=np.int32)


@pytest.fixture(scope="module")
def shape(tiny_llama):
    return load_model_config(str(tiny_llama))


def _engine(tiny_llama, bd_adapters, cap_adapters: float, shape, **kw):
    """A TP-1 engine with adapter 1 pinned and room in the host cache for `cap_adapters` rank-8 request adapters."""
    probe = Engine(Comm(0, 1), str(tiny_llama), max_loras=2)
    one = sum(s.a.nbytes + s.b.nbytes for s in probe.pool.prepare(
        adapter_from_trtllm(*random_request_adapter(shape, 8, 0), shape)).values())
    pinned = sum(s.a.nbytes + s.b.nbytes for s in probe.pool.prepare(load_peft_adapter(bd_adapters[0])).values())
    cap = pinned + int(cap_adapters * one)
    return Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(bd_adapters[0]))], max_loras=2,
                  lora_cache_host_bytes=cap, **kw), one


def _logits(engine, task_id):
    loads, slots = engine.pool.assign([task_id])
    out = engine.lead(StepPlan(loads=loads, chunks=[SeqChunk(0, [5, 17, 3, 99], 0, slots[0])]))
    engine.lead(StepPlan(free=[0]))
    return out


def test_lru_eviction_skips_pinned_and_in_use(tiny_llama, bd_adapters, shape):
    engine, one = _engine(tiny_llama, bd_adapters, 3.5, shape)
    pool = engine.pool
    for t in (10, 11, 12):
        engine.admit_adapter(t, *random_request_adapter(shape, 8, t))
    assert list(pool.host) == [1, 10, 11, 12] and pool.host_bytes_used <= pool.host_cache_bytes
    engine.admit_adapter(13, *random_request_adapter(shape, 8, 13), in_use={10})  # 10 is older, but in use
    assert list(pool.host) == [1, 10, 12, 13]
    engine.admit_adapter(12)  # a request naming a cached id marks it used
    engine.admit_adapter(14, *random_request_adapter(shape, 8, 14))
    assert list(pool.host) == [1, 13, 12, 14], "10 was the least recently used adapter not pinned"
    with pytest.raises(AdapterNotCachedError) as info:
        engine.admit_adapter(11)
    assert str(info.value) == UPSTREAM_NOT_CACHED.format(11)
    with pytest.raises(AdapterCacheFullError) as info:
        engine.admit_adapter(15, *random_request_adapter(shape, 8, 15), in_use={12, 13, 14})
    assert str(info.value).startswith("PEFT Cache is full. Could not store taskId=15")
    assert list(pool.host) == [1, 13, 12, 14] and 1 in pool.pinned
    with pytest.raises(RequestError, match="more than the whole host LoRA cache"):
        engine.admit_adapter(16, *random_request_adapter(shape, 64, 16))
    with pytest.raises(RequestError, match="without a lora_task_id"):
        engine.admit_adapter(None, *random_request_adapter(shape, 8, 17))


def test_evicted_adapter_sent_again_gives_the_same_logits(tiny_llama, bd_adapters, shape):
    engine, _ = _engine(tiny_llama, bd_adapters, 1.5, shape)
    arrays = random_request_adapter(shape, 8, 20)
    engine.admit_adapter(20, *arrays)
    before = _logits(engine, 20)
    assert 20 in engine.pool.slot_of
    engine.admit_adapter(21, *random_request_adapter(shape, 8, 21))
    assert 20 not in engine.pool and 20 not in engine.pool.slot_of  # its slot is free again
    engine.admit_adapter(20, *arrays)
    assert torch.equal(_logits(engine, 20), before)
    assert not torch.equal(_logits(engine, None), before)


def test_unpinned_startup_adapters_are_evictable(tiny_llama, bd_adapters, shape):
    engine, _ = _engine(tiny_llama, bd_adapters, 0.5, shape, pin_adapters=False)
    assert not engine.pool.pinned
    engine.admit_adapter(30, *random_request_adapter(shape, 8, 30))
    assert list(engine.pool.host) == [30]


def test_startup_adapters_must_fit_the_cache(tiny_llama, bd_adapters):
    with pytest.raises(AdapterError, match="more than --lora-cache-host-bytes 1000"):
        Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(bd_adapters[0]))], lora_cache_host_bytes=1000)
    with pytest.raises(AdapterError, match="task id 1 given twice"):
        Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(bd_adapters[0])), (1, str(bd_adapters[1]))])


def test_rank_cap_sizes_slots_once(tiny_llama, bd_adapters, lora_adapter, shape):
    # bd_adapters have ranks 16, 8, 32; the plain LoRA rank 12
    engine = Engine(Comm(0, 1), str(tiny_llama), max_loras=2, max_lora_rank=32,
                    adapters=[(i + 1, str(d)) for i, d in enumerate(bd_adapters)] + [(7, str(lora_adapter))])
    slots = engine.pool.slots[(0, "q_proj")]
    assert slots.a.shape == (2, 32, shape.hidden_size) and slots.b.shape[2] == 32
    buffers = [(ms.a.data_ptr(), ms.b.data_ptr()) for ms in engine.pool.slots.values()]
    for t in (2, 1, 3, 7, 2):
        _logits(engine, t)
    assert [(ms.a.data_ptr(), ms.b.data_ptr()) for ms in engine.pool.slots.values()] == buffers
    with pytest.raises(AdapterError, match="rank 32, over --max-lora-rank 16"):
        Engine(Comm(0, 1), str(tiny_llama), max_lora_rank=16, adapters=[(3, str(bd_adapters[2]))])
    with pytest.raises(AdapterError, match="rank 33 for layer 0 q_proj exceeds --max-lora-rank 32"):
        engine.admit_adapter(40, *random_request_adapter(shape, 33, 40, layers=[0]))
    assert [(ms.a.data_ptr(), ms.b.data_ptr()) for ms in engine.pool.slots.values()] == buffers


def test_lora_weights_size_must_match_lora_config(shape):
    weights, config = random_request_adapter(shape, 4, 1, layers=[0, 1])
    width = weights.shape[2]
    assert width == 4 * (shape.hidden_size + shape.intermediate_size)  # the widest rows: gate / up / down
    adapter_from_trtllm(weights, config, shape, max_rank=64)  # exact: accepted
    for bad in (weights[:, :, : width - 1], np.concatenate([weights, weights[:, :, :1]], axis=2), weights[:, :-1]):
        with pytest.raises(AdapterError, match=rf"lora_config needs lora_weights of float \[14, {width}\]"):
            adapter_from_trtllm(bad, config, shape, max_rank=64)
    with pytest.raises(AdapterError, match="must be > 0"):
        adapter_from_trtllm(weights, config * np.array([1, 1, 0], dtype=np.int32), shape)
    dora = np.concatenate([config, np.ones(config.shape[:2] + (1,), dtype=np.int32)], axis=2)
    with pytest.raises(AdapterError, match="DoRA"):
        adapter_from_trtllm(weights, dora, shape)
    many = np.tile(config, (1, 20, 1))
    with pytest.raises(AdapterError, match="more than the model's 2 layers x 7 modules"):
        adapter_from_trtllm(np.tile(weights, (1, 20, 1)), many, shape)


def test_adapter_scales_are_validated_at_load(tiny_llama, bd_adapters, tmp_path):
    for i, alpha in enumerate([math.nan, math.inf, 1e300, 10**400, "8", True]):
        d = make_peft_adapter(tiny_llama, tmp_path / f"a{i}", seed=i, r=8)
        config = json.loads((d / "adapter_config.json").read_text())
        config["lora_alpha"] = alpha
        (d / "adapter_config.json").write_text(json.dumps(config))  # json writes NaN / Infinity as PEFT would read them
        with pytest.raises(AdapterError) as info:
            load_peft_adapter(d)
        assert "lora_alpha" in str(info.value) and "\n" not in str(info.value)
    rewrite_config(d, lora_alpha=1e6)  # finite, but the scaling (1.25e5) is beyond float16
    load_peft_adapter(d)
    with pytest.raises(AdapterError, match="overflows torch.float16"):
        Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(d))], dtype="float16")
    Engine(Comm(0, 1), str(tiny_llama), adapters=[(1, str(d))], dtype="float32")


def test_request_adapter_overflowing_the_dtype_is_a_request_error(tiny_llama, bd_adapters, shape):
    engine = Engine(Comm(0, 1), str(tiny_llama), dtype="float16")
    weights, config = convert_adapter(load_peft_adapter(bd_adapters[1]), dtype="float32")
    engine.admit_adapter(50, weights, config)
    with pytest.raises(AdapterError, match="overflows torch.float16"):
        engine.admit_adapter(51, weights * np.float32(1e7), config)
    assert 51 not in engine.pool and 50 in engine.pool

"""`trtllm-bdlora project`: the decode-step model's arithmetic on hand-computed cases."""

import json

import pytest

from tests.helpers import run_cli
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.llama.shape import LlamaShape
from trtllm_bdlora.perf.cost_model import Workload, breakdown, collective_time, compute_terms, project, step_collectives
from trtllm_bdlora.perf.presets import Collective, System, module_shapes, resolve_model
from trtllm_bdlora.perf.project import load_kernel_times

TINY = LlamaShape(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16,
                  vocab_size=100)
# 1 GB/s and a huge FLOP rate: every term is bytes / 1e9, so 1 byte = 1 ns
SLOW_MEMORY = System("test", 2, 1e9, 1e18, {"all_reduce": Collective(1e-5, 1e8), "all_gather": Collective(2e-5, 1e8)})


def test_collective_time_latency_bandwidth():
    c = Collective(10e-6, 100e9)
    assert collective_time("all_reduce", 1e6, 8, c) == pytest.approx(10e-6 + 1e6 * (2 * 7 / 8) / 100e9)  # 27.5 us
    assert collective_time("all_reduce", 1e6, 8, c) == pytest.approx(27.5e-6)
    assert collective_time("all_gather", 1e6, 8, c) == pytest.approx(18.75e-6)
    assert collective_time("all_reduce", 1e6, 1, c) == 0.0


def test_step_collectives_slora_counts_and_sizes():
    w = Workload(batch=4, context=10, rank=16, bd_rank=16, adapters=2)
    got = step_collectives(TINY, 2, w, "slora", parallel_lm_head=False)
    # base: 2 all-reduces per layer of T x hidden x 2 bytes = 512 B
    # slora: all-gather of q|k|v shrinks 3 x 4 x 16 x 2 = 384 B, of gate|up 256 B, all-reduces of 4 x 16 x 2 = 128 B
    assert sorted(got) == sorted([("all_reduce", 512, "base_coll", 2), ("all_gather", 384, "lora_coll", 1),
                                  ("all_gather", 256, "lora_coll", 1), ("all_reduce", 128, "lora_coll", 2)])
    assert step_collectives(TINY, 2, w, "bdlora", parallel_lm_head=True) == [
        ("all_reduce", 512, "base_coll", 2), ("all_gather", 4 * 100 * 2, "base_coll", 1)]
    assert step_collectives(TINY, 1, w, "slora", parallel_lm_head=True) == []


def test_module_shapes_tp2():
    assert module_shapes(TINY, 2) == {"q_proj": (64, 32, "column"), "k_proj": (64, 32, "column"), "v_proj": (64, 32, "column"),
                                      "o_proj": (32, 64, "row"), "gate_proj": (64, 64, "column"), "up_proj": (64, 64, "column"),
                                      "down_proj": (64, 64, "row")}


def test_compute_terms_roofline_by_hand():
    """TP 2, T = 2, 2 adapters, bdlora rank 8 -> 4 per rank, 2-byte elements, 1 byte = 1 ns."""
    w = Workload(batch=2, context=10, rank=8, bd_rank=8, adapters=2)
    got = compute_terms(TINY, 2, w, "bdlora", SLOW_MEMORY, parallel_lm_head=True)
    # base GEMMs: bytes 2*(K*M + T*K + T*M): qkv 64x96 -> 2*(6144+128+192) = 12928; o 32x64 -> 2*(2048+64+128) = 4480;
    # gate_up 64x128 -> 2*(8192+128+256) = 17152; down 64x64 -> 2*(4096+128+128) = 8704; lm_head 50x64 -> 2*(3200+128)
    base_ns = 12928 + 4480 + 17152 + 8704 + 6656
    assert got["base_gemm"] == pytest.approx(base_ns * 1e-9)
    # LoRA fused kernel per module: 2*(T*K + n*r*(K+M) + 2*T*M) with n = 2, r = 4:
    # q,k,v (64->32): 2*(128 + 768 + 128) = 2048 each; o (32->64): 2*(64 + 768 + 256) = 2176;
    # gate,up (64->64): 2*(128 + 1024 + 256) = 2816 each; down (64->64): 2816
    assert got["lora"] == pytest.approx((3 * 2048 + 2176 + 2 * 2816 + 2816) * 1e-9)
    # attention: T * context * 2 (K and V) * local KV width (2 heads x 16) * 2 bytes
    assert got["attention"] == pytest.approx(2 * 10 * 2 * 32 * 2 * 1e-9)
    none = compute_terms(TINY, 2, w, "none", SLOW_MEMORY, parallel_lm_head=True)
    assert none["lora"] == 0 and none["base_gemm"] == got["base_gemm"]


def test_slora_kernels_and_speedup_by_hand():
    w = Workload(batch=2, context=10, rank=8, bd_rank=8, adapters=2)
    slora = compute_terms(TINY, 2, w, "slora", SLOW_MEMORY, parallel_lm_head=True)
    # column (q,k,v,gate,up): shrink K=64 -> r/2 = 4: 2*(128 + 2*4*64 + 2*4) = 1296; expand full r = 8 -> M:
    # q,k,v: 2*(16 + 2*8*32 + 2*2*32) = 1312; gate, up: 2*(16 + 2*8*64 + 256) = 2592
    # row (o: K=32, down: K=64): shrink full r = 8: o 2*(64 + 512 + 16) = 1184, down 2*(128 + 1024 + 16) = 2336;
    # expand r=8 -> M/2 = 32: 2*(16 + 512 + 128) = 1312 each
    want = 5 * 1296 + 3 * 1312 + 2 * 2592 + 1184 + 2336 + 2 * 1312
    assert slora["lora"] == pytest.approx(want * 1e-9)
    rows = project(TINY, 2, w, SLOW_MEMORY)
    assert rows["slora"]["speedup_vs_slora"] == 1.0
    for scheme in ("none", "bdlora", "replicated"):
        assert rows[scheme]["speedup_vs_slora"] == pytest.approx(rows["slora"]["total"] / rows[scheme]["total"])
    # slora's LoRA collectives at T = 2, r = 8, n = 2: all-gathers of 3*2*8*2 = 96 B and 64 B (factor 1/2, 20 us),
    # two all-reduces of 32 B (factor 1, 10 us): 61.44 us
    lora_coll = (2e-5 + 96 * 0.5 / 1e8) + (2e-5 + 64 * 0.5 / 1e8) + 2 * (1e-5 + 32 * 1.0 / 1e8)
    assert lora_coll == pytest.approx(61.44e-6)
    assert rows["slora"]["lora_coll"] == pytest.approx(lora_coll)
    assert rows["bdlora"]["lora_coll"] == 0


def test_breakdown_contention_and_custom_collectives():
    compute = {"base_gemm": 1.0, "lora": 0.5, "attention": 0.25, "other": 0.25}
    out = breakdown(compute, [("all_reduce", 100, "base_coll", 3)], SLOW_MEMORY, 4, contention=2.0,
                    collective_fn=lambda kind, nbytes: 0.01)
    assert out["base_gemm"] == 2.0 and out["other"] == 0.5 and out["base_coll"] == pytest.approx(0.03)
    assert out["total"] == pytest.approx(2.0 + 1.0 + 0.5 + 0.5 + 0.03)


def test_kernel_times_lookup_interpolates(tmp_path):
    entries = [{"kind": "fused", "K": 64, "M": 32, "rank": 4, "T": t, "us": us, "adapters": 2, "dtype": "bfloat16"}
               for t, us in ((1, 10.0), (8, 24.0), (64, 80.0))]
    entries.append({"kind": "fused", "K": 64, "M": 32, "rank": 4, "T": 8, "us": 999.0, "adapters": 16, "dtype": "bfloat16"})
    entries += [{"kind": "gemm", "K": 64, "M": 32, "rank": 0, "T": t, "us": us, "adapters": n, "dtype": "bfloat16"}
                for n, us in ((2, 5.0), (16, 7.0)) for t in (1, 8)]  # the suite repeats GEMMs per adapter count
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"kernel_times": entries}))
    kt = load_kernel_times(str(path), adapters=2)
    assert kt("q_proj", "fused", 8, 64, 32, 4) == pytest.approx(24e-6)
    assert kt("q_proj", "fused", 4, 64, 32, 4) == pytest.approx(16e-6)  # 10 + (24-10) * 3/7
    assert kt("q_proj", "fused", 128, 64, 32, 4) == pytest.approx(144e-6)  # extrapolated from (8, 24), (64, 80)
    assert kt("q_proj", "fused", 8, 64, 32, 8) is None
    assert kt("q_proj", "gemm", 4, 64, 32, 0) == pytest.approx(6e-6)  # median of the repeats, flat in T
    assert load_kernel_times(str(path), adapters=3)("q_proj", "fused", 8, 64, 32, 4) == pytest.approx(999e-6)


def test_resolve_model_presets_and_config(tmp_path):
    assert resolve_model("llama-3.1-70b").num_layers == 80
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(tmp_path)) == LlamaShape(64, 128, 3, 4, 2, 16, 100)
    with pytest.raises(BdLoraError, match="not a preset"):
        resolve_model(str(tmp_path / "missing.json"))


def test_project_cli_prints_speedup():
    res = run_cli("project", "--model", "llama-3.1-70b", "--tp", "8", "--gpu", "h100-sxm", "--batch", "16", "--rank", "16")
    assert res.returncode == 0, res.stderr
    line = [x for x in res.stdout.splitlines() if x.startswith("bdlora vs slora:")][0]
    assert line.endswith("x") and float(line.split()[-1][:-1]) > 1.0
    assert {x.split()[0] for x in res.stdout.splitlines()[2:6]} == {"none", "bdlora", "slora", "replicated"}

"""The Triton kernel equals the torch reference (TRITON_INTERPRET=1 on CPU; natively on a GPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from trtllm_bdlora.kernels.lora_ref import multi_lora_ref  # noqa: E402
from trtllm_bdlora.kernels.multi_lora import group_tokens, launch, multi_lora, slot_tables  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_problem(seed, T, num_adapters, dtype, outputs=(48,), K=80, cap=16, no_adapter_frac=0.25):
    gen = torch.Generator().manual_seed(seed)
    S = num_adapters + 1  # one spare slot stays empty
    ranks_host = torch.randint(1, cap + 1, (S,), generator=gen)
    ranks_host[-1] = 0
    a = [torch.randn(S, cap, K, generator=gen) for _ in outputs]
    b = [torch.randn(S, m, cap, generator=gen) for m in outputs]
    ranks = [ranks_host.clone() for _ in outputs]
    ranks[0][0] = max(1, cap // 2)  # outputs of one adapter may have different ranks
    scales = [torch.rand(S, generator=gen) + 0.5 for _ in outputs]
    slot_ids = torch.randint(0, num_adapters, (T,), generator=gen)
    slot_ids[torch.rand(T, generator=gen) < no_adapter_frac] = -1
    x = torch.randn(T, K, generator=gen)
    y = torch.randn(T, sum(outputs) + 8, generator=gen)  # 8 extra columns no output covers
    offsets = [sum(outputs[:i]) for i in range(len(outputs))]
    to = dict(device=DEVICE)
    return dict(
        y=y.to(dtype).to(**to), x=x.to(dtype).to(**to), slot_ids=slot_ids.to(**to),
        a=[t.to(dtype).to(**to) for t in a], b=[t.to(dtype).to(**to) for t in b],
        ranks=[r.to(torch.int32).to(**to) for r in ranks], scales=[s.to(**to) for s in scales], offsets=offsets,
    )


def reference(p):
    """float64 oracle (the torch reference op run in double precision)."""
    y = p["y"].double().cpu()
    return multi_lora_ref(y, p["x"].double().cpu(), p["slot_ids"].cpu(), [a.double().cpu() for a in p["a"]],
                          [b.double().cpu() for b in p["b"]], [r.cpu() for r in p["ranks"]],
                          [s.double().cpu() for s in p["scales"]], p["offsets"])


def rel_err(got, want):
    return float((got.double().cpu() - want).norm() / want.norm())


@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("num_adapters", [1, 3, 5])
def test_kernel_matches_reference_fp32(T, num_adapters):
    p = make_problem(T * 10 + num_adapters, T, num_adapters, torch.float32)
    want = reference(p)
    got = multi_lora(p["y"].clone(), p["x"], p["slot_ids"], p["a"], p["b"], p["ranks"], p["scales"], p["offsets"])
    assert rel_err(got, want) < TOL[torch.float32]
    untouched = (p["slot_ids"] < 0).cpu()
    assert torch.equal(got.cpu()[untouched], p["y"].cpu()[untouched])  # no adapter: bit-identical
    assert torch.equal(got.cpu()[:, -8:], p["y"].cpu()[:, -8:])  # columns outside every output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision(dtype):
    p = make_problem(7, 64, 4, dtype, outputs=(32, 16, 16))
    got = multi_lora(p["y"].clone(), p["x"], p["slot_ids"], p["a"], p["b"], p["ranks"], p["scales"], p["offsets"])
    assert got.dtype == dtype and rel_err(got, reference(p)) < TOL[dtype]


@pytest.mark.parametrize("T", [7, 300])
def test_kernel_multi_output_qkv(T):
    p = make_problem(3 + T, T, 5, torch.float32, outputs=(64, 32, 32))
    got = multi_lora(p["y"].clone(), p["x"], p["slot_ids"], p["a"], p["b"], p["ranks"], p["scales"], p["offsets"])
    assert rel_err(got, reference(p)) < 1e-5


def test_every_covered_element_written():
    """Poison y with NaN: every (adapter token, output column) must become finite and exact, the rest stay NaN."""
    p = make_problem(11, 40, 3, torch.float32, outputs=(32, 16), no_adapter_frac=0.3)
    p["y"].fill_(float("nan"))
    zeros = dict(p, y=torch.zeros_like(p["y"]))
    want = reference(zeros)
    covered = torch.zeros_like(p["y"], dtype=torch.bool).cpu()
    for (lo, m), r in zip([(0, 32), (32, 16)], p["ranks"]):
        for t, s in enumerate(p["slot_ids"].tolist()):
            if s >= 0 and int(r[s]) > 0:
                covered[t, lo : lo + m] = True
    y = torch.full_like(p["y"], float("nan"))
    y[covered.to(y.device)] = 0.0
    got = multi_lora(y, p["x"], p["slot_ids"], p["a"], p["b"], p["ranks"], p["scales"], p["offsets"]).cpu()
    assert torch.isnan(got[~covered]).all()
    assert torch.isfinite(got[covered]).all()
    assert rel_err(got[covered], want[covered]) < 1e-5


def test_bd_block_offset_addressing():
    """A rank multiplies only its BD blocks out of dense zero-padded factors (the TensorRT-LLM page layout):
    A [r, K] and B [M, r] with rank offset tp_rank * r / tp; equals the reference on the extracted blocks."""
    gen = torch.Generator().manual_seed(5)
    tp, T, K, M = 4, 33, 64, 48
    r_full = [16, 8, 32]  # per adapter; each rank owns r / tp
    a_dense = [torch.randn(r, K, generator=gen) for r in r_full]
    b_dense = [torch.randn(M, r, generator=gen) for r in r_full]
    slot_ids = torch.randint(-1, len(r_full), (T,), generator=gen)
    x = torch.randn(T, K, generator=gen)
    y0 = torch.randn(T, M, generator=gen)
    scales = torch.tensor([0.5, 2.0, 1.0])
    for tp_rank in range(tp):
        ptrs = [[a.data_ptr(), b.data_ptr()] for a, b in zip(a_dense, b_dense)]
        meta = [[r // tp, tp_rank * r // tp, r] for r in r_full]  # rank, rank offset, B row stride
        token_idx, seg_start, seg_len = group_tokens(slot_ids, len(r_full))
        got = launch(y0.clone(), x, token_idx, seg_start, seg_len, torch.tensor([ptrs]), torch.tensor([meta],
                     dtype=torch.int32), scales[None], [0], [M], max(r_full) // tp)
        blocks = [(a[tp_rank * r // tp:(tp_rank + 1) * r // tp], b[:, tp_rank * r // tp:(tp_rank + 1) * r // tp])
                  for a, b, r in zip(a_dense, b_dense, r_full)]
        cap = max(r_full) // tp
        a_slots = torch.zeros(len(r_full), cap, K, dtype=torch.float64)
        b_slots = torch.zeros(len(r_full), M, cap, dtype=torch.float64)
        for s, (a, b) in enumerate(blocks):
            a_slots[s, : a.shape[0]], b_slots[s, :, : b.shape[1]] = a, b
        want = multi_lora_ref(y0.double(), x.double(), slot_ids, [a_slots], [b_slots],
                              [torch.tensor([r // tp for r in r_full])], [scales.double()], [0])
        assert rel_err(got, want) < 1e-5


def test_group_tokens_is_a_partition():
    slot_ids = torch.tensor([2, -1, 0, 2, 1, -1, 0, 2])
    token_idx, seg_start, seg_len = group_tokens(slot_ids, 4)
    assert seg_len.tolist() == [2, 1, 3, 0]
    for s in range(4):
        members = token_idx[seg_start[s] : seg_start[s] + seg_len[s]]
        assert all(int(slot_ids[t]) == s for t in members)


def test_slot_tables_shapes():
    a = [torch.zeros(3, 4, 8)]
    b = [torch.zeros(3, 6, 4)]
    ptrs, meta, scales = slot_tables(a, b, [torch.tensor([1, 2, 3])], [torch.ones(3)])
    assert ptrs.shape == (1, 3, 2) and meta.shape == (1, 3, 3) and scales.shape == (1, 3)
    assert int(ptrs[0, 1, 0] - ptrs[0, 0, 0]) == 4 * 8 * 4 and meta[0, :, 2].tolist() == [4, 4, 4]


def test_engine_with_kernel_equals_reference_path(tiny_llama, bd_adapters, lora_adapter):
    """The whole TP-1 engine gives the same logits with the Triton kernel, the batched CPU op and the torch reference."""
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine
    from trtllm_bdlora.engine.plan import SeqChunk, StepPlan

    adapters = [(1, str(bd_adapters[0])), (2, str(bd_adapters[2])), (3, str(lora_adapter))]
    engine = Engine(Comm(0, 1), str(tiny_llama), "bdlora", adapters, max_loras=4)
    loads, slots = engine.pool.assign([1, None, 2, 3])
    for slot, task in loads:
        engine.pool.load(task, slot)
    chunks = [SeqChunk(i, tokens, 0, slot) for i, (tokens, slot) in enumerate(zip([[1, 2, 3, 4], [9, 8], [7, 7, 7], [5, 6]], slots))]
    outs = {}
    for path in ("reference", "torch", "triton"):
        engine.model.lora_kernel = path  # EngineConfig.lora_kernel (TRTLLM_BDLORA_KERNEL)
        outs[path] = engine.execute(StepPlan(chunks=chunks, all_logits=True))
        engine.execute(StepPlan(free=[0, 1, 2, 3]))
    assert float((outs["triton"] - outs["reference"]).abs().max()) < 1e-4
    assert float((outs["torch"] - outs["reference"]).abs().max()) < 1e-4

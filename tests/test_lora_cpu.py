"""The batched CPU LoRA op (kernels/lora_cpu.py) equals the torch reference (kernels/lora_ref.py) and float64."""

import pytest
import torch

from trtllm_bdlora.kernels import lora_cpu
from trtllm_bdlora.kernels.lora_ref import lora_expand_ref, lora_shrink_ref, multi_lora_ref


def _problem(seed: int, T: int, dtype: torch.dtype, num_slots: int = 6, cap: int = 24, dims=(40, 24, 56), K: int = 48):
    """Random adapters of mixed ranks (one of rank 0), non-zero garbage beyond each rank, tokens without
    adapter, slots used out of order and one slot unused."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    a = [rnd(num_slots, cap, K) for _ in dims]
    b = [rnd(num_slots, m, cap) for m in dims]
    ranks = [torch.randint(1, cap + 1, (num_slots,), generator=gen).to(torch.int32) for _ in dims]
    ranks[0][2] = 0
    scales = [torch.rand(num_slots, generator=gen) + 0.5 for _ in dims]
    slot_ids = torch.randint(-1, num_slots - 1, (T,), generator=gen)  # slot num_slots-1 stays unused
    slot_ids[0] = -1
    slot_ids[-1] = 3
    return rnd(T, sum(dims)), rnd(T, K), slot_ids, a, b, ranks, scales, [sum(dims[:i]) for i in range(len(dims))]


def _float64(args):
    y, x, slot_ids, a, b, ranks, scales, offs = args
    return multi_lora_ref(y.double(), x.double(), slot_ids, [t.double() for t in a], [t.double() for t in b], ranks,
                          scales, offs)


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
@pytest.mark.parametrize("T", [1, 9, 150])
def test_multi_lora_cpu_equals_reference(monkeypatch, strategy, T):
    monkeypatch.setattr(lora_cpu, "STRATEGY", strategy)
    for seed in range(3):
        args = _problem(seed, T, torch.float32)
        want = multi_lora_ref(args[0].clone(), *args[1:])
        got = lora_cpu.multi_lora_cpu(args[0].clone(), *args[1:])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.double(), _float64(args), rtol=1e-5, atol=1e-4)
        assert not torch.equal(got, args[0])  # the LoRA terms are not all zero


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [lora_cpu.NATIVE_MIN_TOKENS - 1, lora_cpu.NATIVE_MIN_TOKENS + 17])
def test_multi_lora_cpu_low_precision(monkeypatch, strategy, dtype, T):
    """fp32 accumulation as the reference does: the same result up to one rounding of y (and, for a batch
    multiplied in its own dtype, of h)."""
    monkeypatch.setattr(lora_cpu, "STRATEGY", strategy)
    monkeypatch.setattr(lora_cpu, "onednn_fast", lambda dtype: True)  # the native path is tested on any CPU
    args = _problem(7, T, dtype)
    native = lora_cpu._native(args[1])
    assert native == (T >= lora_cpu.NATIVE_MIN_TOKENS)
    got = lora_cpu.multi_lora_cpu(args[0].clone(), *args[1:])
    if not native:
        want = multi_lora_ref(args[0].clone(), *args[1:])
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 8)
    # against float64, within the rounding of y, h and scale * B: one epsilon of the dtype times the
    # same sum taken over absolute values (a wrong slot, rank or scale is off by the size of a whole term)
    y, x, slot_ids, a, b, ranks, scales, offs = args
    size = multi_lora_ref(y.double().abs(), x.double().abs(), slot_ids, [t.double().abs() for t in a],
                          [t.double().abs() for t in b], ranks, scales, offs)
    err = (got.double() - _float64(args)).abs()
    assert (err <= torch.finfo(dtype).eps * size).all(), float((err / size).max())
    assert (_float64(args) - y.double()).abs().max() > 1  # the LoRA terms are there


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
def test_shrink_expand_cpu_equal_reference(monkeypatch, strategy):
    monkeypatch.setattr(lora_cpu, "STRATEGY", strategy)
    y, x, slot_ids, a, b, ranks, scales, _ = _problem(11, 70, torch.float32)
    h_want = lora_shrink_ref(x, a[0], slot_ids, ranks[0])
    h_got = lora_cpu.lora_shrink_cpu(x, a[0], slot_ids, ranks[0])
    torch.testing.assert_close(h_got, h_want, rtol=1e-5, atol=1e-4)
    want = lora_expand_ref(y[:, :40].clone(), h_want, b[0], slot_ids, ranks[0], scales[0])
    got = lora_cpu.lora_expand_cpu(y[:, :40].clone(), h_want, b[0], slot_ids, ranks[0], scales[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_no_adapter_tokens_leave_y_unchanged():
    y, x, slot_ids, a, b, ranks, scales, offs = _problem(3, 8, torch.float32)
    none = torch.full_like(slot_ids, -1)
    assert torch.equal(lora_cpu.multi_lora_cpu(y.clone(), x, none, a, b, ranks, scales, offs), y)
    assert not lora_cpu.lora_shrink_cpu(x, a[0], none, ranks[0]).any()


def test_token_groups_follow_new_slot_ids():
    """The per-step grouping cache must not serve a stale grouping for a new (or modified) slot-id tensor."""
    first = torch.tensor([0, 1, 1, -1])
    assert lora_cpu.token_groups(first).num_slots == 2
    assert lora_cpu.token_groups(torch.tensor([2, -1])).num_slots == 3
    first[0] = 3
    assert lora_cpu.token_groups(first).num_slots == 4


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
def test_prepared_factors_follow_slot_loads(monkeypatch, strategy):
    """Stacked B is cached per slot buffer: an in-place load (new factors, rank, scale) must be seen."""
    monkeypatch.setattr(lora_cpu, "STRATEGY", strategy)
    y, x, slot_ids, a, b, ranks, scales, offs = _problem(5, 12, torch.float32)
    lora_cpu.multi_lora_cpu(y.clone(), x, slot_ids, a, b, ranks, scales, offs)
    b[0][3] = torch.randn_like(b[0][3])
    ranks[0][3] = 5
    scales[1][3] = 3.0
    want = multi_lora_ref(y.clone(), x, slot_ids, a, b, ranks, scales, offs)
    torch.testing.assert_close(lora_cpu.multi_lora_cpu(y.clone(), x, slot_ids, a, b, ranks, scales, offs), want,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
def test_slots_wider_than_the_loaded_ranks(monkeypatch, strategy):
    """Slots sized for max_lora_rank hold adapters of smaller rank (the engine's usual case): the op reads only
    the columns up to the largest loaded rank, ignores the garbage beyond it, and widens again when an adapter of a
    larger rank is loaded into a slot in place."""
    monkeypatch.setattr(lora_cpu, "STRATEGY", strategy)
    y, x, slot_ids, a, b, ranks, scales, offs = _problem(13, 40, torch.float32, cap=64)
    for r in ranks:
        r.clamp_(max=7)
    for _ in range(2):
        want = multi_lora_ref(y.clone(), x, slot_ids, a, b, ranks, scales, offs)
        got = lora_cpu.multi_lora_cpu(y.clone(), x, slot_ids, a, b, ranks, scales, offs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.double(), _float64((y, x, slot_ids, a, b, ranks, scales, offs)),
                                   rtol=1e-5, atol=1e-4)
        ranks[1][3] = 41  # an in-place load of a wider adapter into a used slot
        a[1][3].normal_()

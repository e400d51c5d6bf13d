"""The engine's base linear (engine/linear.py): the oneDNN-packed product and its row padding equal float64."""

import pytest
import torch

from trtllm_bdlora.engine.linear import Linear, padded_rows


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64, 65, 129])
@pytest.mark.parametrize("pack", [True, False])
def test_linear_equals_float64(rows, pack):
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(72, 40, generator=gen), torch.randn(rows, 40, generator=gen)
    y = Linear(weight, pack=pack)(x)
    assert y.shape == (rows, 72)
    torch.testing.assert_close(y.double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5)


def test_padded_rows_bounds_padding_and_kernels():
    padded = [padded_rows(r) for r in range(1, 8193)]
    assert all(r <= p for r, p in zip(range(1, 8193), padded))
    assert all(p == r for r, p in zip(range(8, 65, 8), padded[7:64:8]))  # decode batches of 8k rows: no padding
    assert all(p - r <= max(7, r // 8) for r, p in zip(range(1, 8193), padded))
    assert len(set(padded)) <= 64  # oneDNN kernels a server meets up to 8192 rows: 8 per doubling


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_linear_on_any_cpu(dtype):
    """bf16 / fp16 weights are packed only where oneDNN has kernels for them (AVX-512 / AMX); on an AVX2 CPU the
    packing op refuses them, so the plain product runs instead. Either way the result is the float64 product
    within one rounding of the output (fp32 accumulation)."""
    from trtllm_bdlora.kernels.cpu_features import onednn_fast

    gen = torch.Generator().manual_seed(5)
    weight, x = torch.randn(72, 40, generator=gen).to(dtype), torch.randn(9, 40, generator=gen).to(dtype)
    linear = Linear(weight)
    assert (linear.packed is not None) == onednn_fast(dtype)
    y = linear(x)
    want = x.double() @ weight.double().T
    size = x.double().abs() @ weight.double().abs().T
    assert y.dtype == dtype and ((y.double() - want).abs() <= 2 * torch.finfo(dtype).eps * size).all()


def test_slow_dtype_note_names_the_dtype_only_where_it_is_slow():
    from trtllm_bdlora.kernels.cpu_features import onednn_fast, slow_dtype_note

    cpu = torch.device("cpu")
    assert slow_dtype_note(torch.float32, cpu) is None
    assert slow_dtype_note(torch.bfloat16, torch.device("meta")) is None
    note = slow_dtype_note(torch.bfloat16, cpu)
    assert (note is None) == onednn_fast(torch.bfloat16)
    if note is not None:
        assert "\n" not in note and "--dtype bfloat16" in note and "float32" in note

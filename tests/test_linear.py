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

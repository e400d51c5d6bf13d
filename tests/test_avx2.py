"""The AVX2 float32 kernels (kernels/avx2.c through kernels/avx2.py), GEMM and decode attention, against float64,
and the rules that choose them."""

import logging

import pytest
import torch

from trtllm_bdlora.engine.linear import Linear
from trtllm_bdlora.kernels import avx2

needs_avx2 = pytest.mark.skipif(not avx2.cpu_has_avx2(), reason="the kernel needs AVX2 and FMA")


@pytest.fixture
def choice(cpu_kernels):
    """Set TRTLLM_BDLORA_CPU_KERNELS's value within the test (conftest's cpu_kernels restores it after)."""
    def set_choice(value: str) -> None:
        cpu_kernels.CHOICE = value
        cpu_kernels._library.cache_clear()
    return set_choice


@needs_avx2
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k", [(72, 40), (16, 1), (5, 33), (12, 9), (49, 576), (3072, 576)])
def test_kernel_equals_float64(choice, n, k, threads):
    choice("avx2")
    gen = torch.Generator().manual_seed(n * 1000 + k)
    weight = torch.randn(n, k, generator=gen)
    packed = avx2.pack(weight)
    assert packed.shape == (-(-n // avx2.PANEL), k, avx2.PANEL)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 64, 129):
            x = torch.randn(rows, k, generator=gen)
            y = avx2.matmul(x, packed, n)
            want = x.double() @ weight.double().T
            size = x.double().abs() @ weight.double().abs().T  # fp32 accumulation: error within k roundings of |x||W|
            assert y.shape == (rows, n) and y.dtype == torch.float32
            assert ((y.double() - want).abs() <= k * torch.finfo(torch.float32).eps * size + 1e-30).all(), rows
    finally:
        torch.set_num_threads(previous)


@needs_avx2
def test_kernel_takes_views_and_empty_batches(choice):
    choice("avx2")
    weight = torch.randn(40, 24)
    packed = avx2.pack(weight.T.contiguous().T)  # a weight of another layout packs the same
    x = torch.randn(6, 48)[:, ::2]  # not contiguous
    torch.testing.assert_close(avx2.matmul(x, packed, 40).double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5)
    assert avx2.matmul(torch.empty(0, 24), packed, 40).shape == (0, 40)
    with pytest.raises(ValueError, match="24 input features"):
        avx2.matmul(torch.randn(2, 23), packed, 40)


@needs_avx2
@pytest.mark.parametrize("value", ["avx2", "torch"])
def test_linear_uses_the_chosen_gemm(choice, value):
    choice(value)
    gen = torch.Generator().manual_seed(3)
    weight, x = torch.randn(72, 40, generator=gen), torch.randn(9, 40, generator=gen)
    linear = Linear(weight)
    assert (linear.panels is not None) == (value == "avx2")
    torch.testing.assert_close(linear(x).double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5)
    assert Linear(weight.to(torch.bfloat16)).panels is None  # float32 only


def test_auto_leaves_avx512_cpus_to_torch(choice, monkeypatch):
    monkeypatch.setattr(avx2, "_capability", lambda: "AVX512")
    choice("auto")
    assert not avx2.usable(torch.randn(4, 4))
    monkeypatch.setattr(avx2, "_capability", lambda: "DEFAULT")
    choice("avx2")
    assert not avx2.usable(torch.randn(4, 4))


@needs_avx2
def test_failed_build_warns_once_and_falls_back(choice, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TRTLLM_BDLORA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    choice("avx2")
    with caplog.at_level(logging.WARNING, logger="trtllm_bdlora.kernels.avx2"):
        assert not avx2.usable(torch.randn(4, 4))
        assert not avx2.usable(torch.randn(4, 4))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "could not be built" in warnings[0] and "torch's" in warnings[0]
    weight = torch.randn(8, 4)
    torch.testing.assert_close(Linear(weight)(torch.ones(1, 4)), torch.ones(1, 4) @ weight.T)


def test_unknown_choice_names_the_variable(choice):
    choice("fast")
    with pytest.raises(ValueError, match="TRTLLM_BDLORA_CPU_KERNELS='fast'"):
        avx2.usable(torch.randn(4, 4))


def _reference_decode(q, k, v, rows, lengths):
    """float64 attention of one query per token over keys 0..length-1 of its cache row, KV heads repeated."""
    group = q.shape[1] // k.shape[1]
    out = []
    for i, (row, length) in enumerate(zip(rows.tolist(), lengths.tolist())):
        keys = k[row, :, :length].double().repeat_interleave(group, dim=0)  # [heads, length, d]
        values = v[row, :, :length].double().repeat_interleave(group, dim=0)
        scores = (keys @ q[i].double()[:, :, None])[..., 0] / q.shape[-1] ** 0.5
        out.append((scores.softmax(-1)[:, None, :] @ values)[:, 0].reshape(-1))
    return torch.stack(out)


def _attention_on_threads(threads: int, *args) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        avx2.cache_attention(*args)
    finally:
        torch.set_num_threads(previous)


@needs_avx2
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 16), (8, 1, 8)])
def test_cache_attention_equals_float64(choice, heads, kv_heads, d, threads):
    """Tokens in another order than their rows, rows of different lengths (1 to the capacity), q a strided view
    (the engine's rotated q and k share one tensor), outputs scattered to the tokens' places."""
    choice("avx2")
    gen = torch.Generator().manual_seed(heads * 100 + d)
    rows_total, capacity, t = 6, 32, 7
    k = torch.randn(rows_total, kv_heads, capacity, d, generator=gen)
    v = torch.randn(rows_total, kv_heads, capacity, d, generator=gen)
    qk = torch.randn(t, heads + kv_heads, d, generator=gen)
    q = qk[:, :heads]
    tokens, rows, lengths = torch.tensor([5, 0, 3, 6]), torch.tensor([2, 4, 0, 5]), torch.tensor([1, 32, 17, 9])
    out = torch.full((t, heads * d), 7.0)
    _attention_on_threads(threads, q, k, v, tokens, rows, lengths, out)
    torch.testing.assert_close(out[tokens].double(), _reference_decode(q[tokens], k, v, rows, lengths),
                               rtol=1e-5, atol=1e-5)
    untouched = torch.ones(t, dtype=torch.bool)
    untouched[tokens] = False
    assert (out[untouched] == 7.0).all()  # other tokens' outputs are left as they are
    with pytest.raises(ValueError, match="layout"):
        avx2.cache_attention(q, k, v, tokens, rows, lengths, out.T)


@needs_avx2
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (8, 1, 8), (4, 4, 16), (6, 2, 24), (16, 1, 8)])
def test_cache_attention_prompt_chunks_equal_float64(choice, heads, kv_heads, d, threads):
    """A step as the engine makes it: prompt chunks (consecutive tokens of one cache row, each seeing the keys up to
    its own position) beside decoding tokens. The chunks start past the first key blocks, cross block and task
    boundaries (a 33-token chunk leaves a task of one token), and are one to 150 tokens long; a group of 8 heads
    spans more than one 6-row tile, one of 16 more than a decoding token's 12-row tile, and d = 24 leaves a
    half-width tail of features."""
    choice("avx2")
    gen = torch.Generator().manual_seed(heads * 1000 + d * 10 + threads)
    rows_total, capacity = 5, 256
    k = torch.randn(rows_total, kv_heads, capacity, d, generator=gen)
    v = torch.randn(rows_total, kv_heads, capacity, d, generator=gen)
    # (row, first position, tokens): chunks and decoding tokens, in the step's order
    pieces = [(3, 0, 1), (1, 70, 150), (4, 200, 1), (0, 0, 33), (2, 129, 2), (3, 255, 1)]
    rows = torch.tensor([r for r, start, n in pieces for _ in range(n)])
    lengths = torch.tensor([start + i + 1 for _, start, n in pieces for i in range(n)])
    t = len(rows)
    tokens = torch.arange(t)
    q = torch.randn(t, heads + kv_heads, d, generator=gen)[:, :heads]
    out = torch.full((t, heads * d), 7.0)
    _attention_on_threads(threads, q, k, v, tokens, rows, lengths, out)
    torch.testing.assert_close(out.double(), _reference_decode(q, k, v, rows, lengths), rtol=1e-5, atol=1e-5)


@needs_avx2
@pytest.mark.parametrize("position", [39, 21])
def test_a_non_finite_key_or_value_reaches_only_the_tokens_that_see_it(choice, position):
    """inf in the value and NaN in the key of one position of a prompt chunk (a bad adapter's output, or an
    overflow): the tokens before it in the chunk, which do not see it, stay finite and exact; the others are not
    finite, as in float64."""
    choice("avx2")
    gen = torch.Generator().manual_seed(position)
    heads, kv_heads, d, n = 9, 3, 64, 40
    k = torch.randn(1, kv_heads, 64, d, generator=gen)
    v = torch.randn(1, kv_heads, 64, d, generator=gen)
    v[0, :, position] = float("inf")
    k[0, 1, position, 3] = float("nan")
    q = torch.randn(n, heads, d, generator=gen)
    rows, lengths = torch.zeros(n, dtype=torch.long), torch.arange(1, n + 1)
    out = torch.empty(n, heads * d)
    avx2.cache_attention(q, k, v, torch.arange(n), rows, lengths, out)
    reference = _reference_decode(q, k, v, rows, lengths)
    blind = slice(0, position)  # tokens before the position
    torch.testing.assert_close(out[blind].double(), reference[blind], rtol=1e-5, atol=1e-5)
    assert not out[position:].isfinite().all(dim=1).any() and not reference[position:].isfinite().all(dim=1).any()


@needs_avx2
def test_rope_store_equals_torch_bits(choice):
    """q rotated in place (the same bits as torch's x * cos + rotate_half(x) * sin), k rotated and v copied into the
    caches' rows at the slots; nothing else written."""
    from trtllm_bdlora.engine.llama import rotate_half

    choice("avx2")
    gen = torch.Generator().manual_seed(11)
    t, heads, kv_heads, d = 5, 6, 2, 32
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen)
    angles = torch.rand(t, d // 2, generator=gen) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    qk = qkv[:, : (heads + kv_heads) * d].view(t, heads + kv_heads, d)
    want = qk * cos[:, None] + rotate_half(qk) * sin[:, None]
    v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d).clone()
    slots = torch.randperm(40, generator=gen)[: t * kv_heads]
    k_cache, v_cache = torch.full((40, d), 7.0), torch.full((40, d), 7.0)
    q = avx2.rope_store(qkv, heads, kv_heads, cos, sin, slots, k_cache, v_cache)
    assert q.data_ptr() == qkv.data_ptr() and torch.equal(q, want[:, :heads])
    assert torch.equal(k_cache[slots], want[:, heads:].reshape(-1, d))
    assert torch.equal(v_cache[slots], v.reshape(-1, d))
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    assert (k_cache[untouched] == 7.0).all() and (v_cache[untouched] == 7.0).all()
    with pytest.raises(ValueError, match="layout"):
        avx2.rope_store(qkv, heads, kv_heads, cos, sin, slots[:-1], k_cache, v_cache)


@needs_avx2
@pytest.mark.parametrize("residual", [True, False])
def test_add_rms_norm_equals_float64(choice, residual):
    choice("avx2")
    gen = torch.Generator().manual_seed(12)
    x, o, w = torch.randn(9, 96, generator=gen) * 3, torch.randn(9, 96, generator=gen), torch.randn(96, generator=gen)
    x0 = x.clone()
    h = avx2.add_rms_norm(x, o if residual else None, w, 1e-5)
    total = x0.double() + (o.double() if residual else 0)
    want = w.double() * total / (total.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(x.double(), total, rtol=1e-7, atol=1e-7)  # x holds the sum afterwards
    torch.testing.assert_close(h.double(), want, rtol=2e-6, atol=1e-6)


@needs_avx2
def test_silu_mul_equals_float64(choice):
    """Gates from -100 to 100 (e^-|g| underflows at both ends) and strided rows, as the LoRA-added gate_up is."""
    choice("avx2")
    gen = torch.Generator().manual_seed(13)
    gate_up = torch.randn(7, 2 * 40 + 8, generator=gen)[:, :80] * 4
    gate_up[0, :40] = torch.linspace(-100, 100, 40)
    got = avx2.silu_mul(gate_up)
    g, u = gate_up[:, :40].double(), gate_up[:, 40:].double()
    torch.testing.assert_close(got.double(), g * torch.sigmoid(g) * u, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", ["avx2", "torch"])
def test_engine_fuses_the_layer_ops_only_where_chosen(choice, value, tiny_llama):
    """The model uses the fused RoPE / norm / SiLU ops in float32 under avx2, torch's otherwise (and in bfloat16)."""
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine

    if value == "avx2" and not avx2.cpu_has_avx2():
        pytest.skip("the AVX2 kernels need AVX2 and FMA")
    choice(value)
    for dtype, fused in (("float32", value == "avx2"), ("bfloat16", False)):
        engine = Engine(Comm(0, 1, torch.device("cpu")), str(tiny_llama), "bdlora", [], max_loras=1, dtype=dtype)
        assert engine.model.fused_ops == fused


@pytest.mark.parametrize("value", ["avx2", "torch"])
def test_engine_start_log_names_the_kernels(choice, value, tiny_llama, caplog):
    from trtllm_bdlora.distributed.comm import Comm
    from trtllm_bdlora.engine.engine import Engine

    if value == "avx2" and not avx2.cpu_has_avx2():
        pytest.skip("the AVX2 kernels need AVX2 and FMA")
    choice(value)
    with caplog.at_level(logging.INFO, logger="trtllm_bdlora.engine"):
        Engine(Comm(0, 1, torch.device("cpu")), str(tiny_llama), "bdlora", [], max_loras=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("float32 CPU kernels: ")]
    assert lines == [f"float32 CPU kernels: {avx2.chosen()}"]
    assert ("avx2.c" in lines[0]) == (value == "avx2")

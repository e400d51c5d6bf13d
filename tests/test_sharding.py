"""Per-rank math of every scheme reproduces the unsharded layer exactly (fp64), and BD-LoRA is rank-local."""

import pytest
import torch

from trtllm_bdlora.adapters.lora import LoraFactors
from trtllm_bdlora.errors import ModelError
from trtllm_bdlora.llama.shape import LLAMA_MODULES, LlamaShape, module_role
from trtllm_bdlora.sharding import SCHEMES, LoraShard, bd_misfit, make_layout, shard_lora, vocab_shard

SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=16, num_kv_heads=8, head_dim=16)
GQA = LlamaShape(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=16, num_kv_heads=2, head_dim=16)


def apply_lora_shard(x_local: torch.Tensor, shard: LoraShard, out_features: int, comm) -> torch.Tensor:
    """Reference per-rank math: the rank's (T, out_features) LoRA contribution (a partial sum for row modules)."""
    h = x_local @ shard.a.T
    if shard.collective == "all_gather":
        h = comm.all_gather(h)
    elif shard.collective == "all_reduce":
        h = comm.all_reduce(h)
    y = x_local.new_zeros(x_local.shape[0], out_features)
    y[:, shard.out_offset : shard.out_offset + shard.b.shape[0]] = shard.scaling * (h @ shard.b.T)
    return y


class NoComm:
    def all_gather(self, t):
        raise AssertionError("BD-LoRA issued an all-gather")

    def all_reduce(self, t):
        raise AssertionError("BD-LoRA issued an all-reduce")


def random_factors(name, shape, r, nblocks, gen, bd=True):
    inp, out = shape.module_dims(name)
    role = module_role(name)
    bd_factor = ("B" if role == "column" else "A") if bd else None
    a_cols = inp // nblocks if bd_factor == "A" else inp
    b_cols = r // nblocks if bd_factor == "B" else r
    a = torch.randn(r, a_cols, generator=gen, dtype=torch.float64)
    b = torch.randn(out, b_cols, generator=gen, dtype=torch.float64)
    return LoraFactors(a, b, 0.75, role, bd_factor, nblocks if bd_factor else 1)


def local_input(x, name, layout, rank):
    return x[:, layout.in_slice(name, rank)] if module_role(name) == "row" else x


def sharded_forward(x, w, f, name, layout, scheme):
    """Run every rank, with slora's collectives computed across the ranks' intermediates."""
    world = layout.world
    shards = [shard_lora(f, name, layout, r, scheme) for r in range(world)]
    xs = [local_input(x, name, layout, r) for r in range(world)]
    hs = [xs[r] @ shards[r].a.T for r in range(world)]

    class Gathered:
        def __init__(self, value):
            self.value = value

        def all_gather(self, t):
            return self.value

        def all_reduce(self, t):
            return self.value

    if shards[0].collective == "all_gather":
        comm = Gathered(torch.cat(hs, dim=-1))
    elif shards[0].collective == "all_reduce":
        comm = Gathered(sum(hs))
    else:
        comm = NoComm()
    _, out = layout.shape.module_dims(name)
    if module_role(name) == "column":
        base = [xs[r] @ w[layout.out_slice(name, r)].T for r in range(world)]
        lora = [apply_lora_shard(xs[r], shards[r], base[r].shape[1], comm) for r in range(world)]
        pieces = [b + lo for b, lo in zip(base, lora)]
        if layout.kv_replicated and name in ("k_proj", "v_proj"):
            per_head = world // layout.shape.num_kv_heads
            pieces = pieces[::per_head]
        return torch.cat(pieces, dim=-1)
    partials = [xs[r] @ w[:, layout.in_slice(name, r)].T + apply_lora_shard(xs[r], shards[r], out, comm)
                for r in range(world)]
    return sum(partials)  # the base model's own all-reduce


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bd", [True, False], ids=["bd_adapter", "plain_adapter"])
@pytest.mark.parametrize("shape", [SHAPE, GQA], ids=["mha", "gqa_replicated_kv"])
def test_sharded_equals_unsharded(world, scheme, bd, shape):
    gen = torch.Generator().manual_seed(1000 * world + SCHEMES.index(scheme) + 7 * bd)
    layout = make_layout(shape, world)
    for name in LLAMA_MODULES:
        inp, out = shape.module_dims(name)
        f = random_factors(name, shape, r=24 if bd else 20, nblocks=8, gen=gen, bd=bd)
        w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
        x = torch.randn(5, inp, generator=gen, dtype=torch.float64)
        want = x @ w.T + f.scaling * x @ f.dense_a().T @ f.dense_b().T
        got = sharded_forward(x, w, f, name, layout, scheme)
        assert rel_err(got, want) < 1e-10, (name, scheme, world)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_bdlora_is_rank_local(world):
    """Each rank's shard is a function of its own blocks only, has rank r/N, and needs no collective."""
    gen = torch.Generator().manual_seed(world)
    layout = make_layout(SHAPE, world)
    r, nb = 32, 8
    for name in LLAMA_MODULES:
        f = random_factors(name, SHAPE, r, nb, gen)
        assert bd_misfit(f, name, layout) is None
        for rank in range(world):
            shard = shard_lora(f, name, layout, rank, "bdlora")
            assert shard.collective == "none" and shard.rank == r // world
            # perturb every block this rank does not own: its shard must not change
            a, b = f.a.clone(), f.b.clone()
            r_own = slice(rank * r // world, (rank + 1) * r // world)
            if f.role == "column":
                mask = torch.ones(b.shape[0], dtype=torch.bool)
                mask[layout.out_slice(name, rank)] = False
                b[mask] += 1.0
                a_mask = torch.ones(r, dtype=torch.bool)
                a_mask[r_own] = False
                a[a_mask] += 1.0
            else:
                a_mask = torch.ones(r, dtype=torch.bool)
                a_mask[r_own] = False
                a[a_mask] += 1.0
                b_mask = torch.ones(r, dtype=torch.bool)
                b_mask[r_own] = False
                b[:, b_mask] += 1.0
            other = LoraFactors(a, b, f.scaling, f.role, f.bd_factor, f.nblocks)
            shard2 = shard_lora(other, name, layout, rank, "bdlora")
            assert torch.equal(shard.a, shard2.a) and torch.equal(shard.b, shard2.b)
            x_local = torch.randn(3, shard.a.shape[1], generator=gen, dtype=torch.float64)
            apply_lora_shard(x_local, shard, shard.b.shape[0], NoComm())


def test_bd_fallbacks_are_explained():
    gen = torch.Generator().manual_seed(0)
    f = random_factors("q_proj", SHAPE, 24, 8, gen)
    assert "nblocks=8 is not a multiple of tp=3" in bd_misfit(f, "q_proj", make_layout(
        LlamaShape(192, 384, 1, 12, 12, 16), 3))
    k = random_factors("k_proj", GQA, 24, 8, gen)
    assert "KV heads are replicated" in bd_misfit(k, "k_proj", make_layout(GQA, 8))
    plain = random_factors("o_proj", SHAPE, 24, 8, gen, bd=False)
    assert "plain LoRA" in bd_misfit(plain, "o_proj", make_layout(SHAPE, 2))
    wrong = LoraFactors(f.a, f.b, 1.0, "row", "B", 8)
    assert "needs block-diagonal A" in bd_misfit(wrong, "o_proj", make_layout(SHAPE, 2))


@pytest.mark.parametrize(
    "shape, world, fragment",
    [
        (LlamaShape(64, 128, 1, 6, 6, 16), 4, "does not divide num_attention_heads=6"),
        (LlamaShape(64, 128, 1, 8, 4, 8), 8, None),
        (LlamaShape(96, 192, 1, 12, 4, 8), 6, "exceeds num_key_value_heads=4 and is not a multiple"),
        (LlamaShape(64, 100, 1, 8, 8, 8), 8, "does not divide intermediate_size=100"),
    ],
)
def test_layout_errors(shape, world, fragment):
    if fragment is None:
        assert make_layout(shape, world).kv_replicated
        return
    with pytest.raises(ModelError, match=fragment):
        make_layout(shape, world)


@pytest.mark.parametrize("vocab, world", [(12, 3), (10, 3), (7, 4), (5, 8)])
def test_vocab_shards_side_by_side_give_the_logits(vocab, world):
    gen = torch.Generator().manual_seed(vocab * world)
    lm_head, x = torch.randn(vocab, 6, generator=gen), torch.randn(4, 6, generator=gen)
    shards = [vocab_shard(lm_head, world, r) for r in range(world)]
    assert len({s.shape for s in shards}) == 1  # the same shape on every rank, as the all-gather needs
    logits = torch.cat([x @ s.T for s in shards], dim=-1)
    torch.testing.assert_close(logits[:, :vocab].double(), x.double() @ lm_head.double().T, rtol=1e-6, atol=1e-6)
    assert torch.all(logits[:, vocab:] == 0)

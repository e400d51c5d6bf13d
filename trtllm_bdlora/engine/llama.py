"""A tensor-parallel Llama for one rank: column/row-parallel linears with multi-adapter LoRA sites.

Tokens of all sequences in a step are flattened into one [T, hidden] batch (as nano-vllm does); attention
reads and writes the preallocated KV cache (`kv_cache.py`) in at most two calls per layer (`attention.py`).
In float32 on an AVX2 CPU (`fused_ops`) RoPE with the cache write, each residual add with the RMSNorm after it, and
SiLU-and-multiply are one `kernels.avx2` call each instead of several torch ops.
The base collectives are the all-reduces after o_proj and down_proj and one all-gather of the logits: the LM head is
vocabulary-parallel (each rank multiplies its rows, as vLLM's ParallelLMHead); embedding and norms are replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.engine.adapter_pool import AdapterPool
from trtllm_bdlora.engine.attention import step_attention, write_kv
from trtllm_bdlora.engine.kv_cache import KVBudget, KVCache
from trtllm_bdlora.engine.linear import Linear
from trtllm_bdlora.engine.lora_op import apply_lora_group
from trtllm_bdlora.engine.plan import SeqChunk
from trtllm_bdlora.engine.sampler import finite_rows
from trtllm_bdlora.kernels import avx2
from trtllm_bdlora.llama.config_json import LlamaConfigJson
from trtllm_bdlora.llama.shape import LINEAR_GROUPS
from trtllm_bdlora.sharding import TPLayout, shard_llama_state_dict, vocab_shard

QKV, GATE_UP = LINEAR_GROUPS["qkv"], LINEAR_GROUPS["gate_up"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rotary:
    """RoPE's cos and sin per position from the model's `rope_parameters` by transformers' own functions (default,
    linear, llama3, yarn, ...), without importing its Llama module (seconds per rank at start-up). Types that rescale
    with the sequence length ("dynamic", "longrope") use transformers' LlamaRotaryEmbedding."""

    def __init__(self, config, device: torch.device):
        rope_type = config.rope_parameters["rope_type"]
        if rope_type in ("dynamic", "longrope"):
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            self.module = LlamaRotaryEmbedding(config=_transformers_config(config)).to(device)
            return
        self.module = None
        if rope_type == "default":
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            base = config.rope_parameters["rope_theta"]
            inv_freq, self.scaling = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](_transformers_config(config))
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [len(positions), head_dim] in float32."""
        if self.module is not None:
            cos, sin = self.module(self.module.inv_freq[None, None], positions.unsqueeze(0))
            return cos[0], sin[0]
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def _transformers_config(config):
    """transformers' own config for its functions: llama/config_json.py's gives it by hf()."""
    return config.hf() if isinstance(config, LlamaConfigJson) else config


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TPLlama:
    def __init__(self, config, state_dict, layout: TPLayout, comm: Comm, pool: AdapterPool, scheme: str,
                 dtype: torch.dtype, device: torch.device, kv_budget: KVBudget, presharded: bool = False,
                 lora_kernel: str = "auto"):
        self.config, self.layout, self.comm, self.pool, self.scheme = config, layout, comm, pool, scheme
        self.lora_kernel = lora_kernel  # config.LORA_KERNELS
        self.dtype, self.device = dtype, device
        shard = state_dict if presharded else shard_llama_state_dict(state_dict, layout, comm.rank)
        w = {k: v.to(device=device, dtype=dtype) for k, v in shard.items()}
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        lm_head = w.pop("lm_head.weight")
        self.vocab_size = lm_head.shape[0]
        self.lm_head = Linear(vocab_shard(lm_head, layout.world, comm.rank) if layout.world > 1 else lm_head)
        self.layers = []
        for i in range(layout.shape.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "in_norm": w[p + "input_layernorm.weight"],
                "post_norm": w[p + "post_attention_layernorm.weight"],
                "qkv": Linear(torch.cat([w[p + f"self_attn.{n}.weight"] for n in QKV])),
                "o": Linear(w.pop(p + "self_attn.o_proj.weight")),
                "gate_up": Linear(torch.cat([w[p + f"mlp.{n}.weight"] for n in GATE_UP])),
                "down": Linear(w.pop(p + "mlp.down_proj.weight")),
            })
        hd = layout.shape.head_dim
        self.q_size = layout.local_heads * hd
        self.kv_size = layout.local_kv_heads * hd
        self.inter = layout.shape.intermediate_size // layout.world
        self.rotary = Rotary(config, device)
        self.eps = config.rms_norm_eps
        self.kv_cache = KVCache(len(self.layers), layout.local_kv_heads, hd, dtype, device, kv_budget)
        # float32 on an AVX2 CPU: RoPE with the cache write, residual add with RMSNorm, SiLU-and-multiply in one call each
        self.fused_ops = avx2.layer_ops_usable(self.embed, hd, self.embed.shape[1], self.inter)

    def free(self, seq_id: int) -> None:
        self.kv_cache.free(seq_id)

    def _lora(self, y, x, slot_ids, layer, names, offsets, role):
        if slot_ids is None:  # no token of this step has an adapter (decided once per step in forward)
            return y
        slots = [self.pool.slots[(layer, n)] for n in names]
        return apply_lora_group(y, x, slot_ids, slots, offsets, self.scheme, role, self.comm, self.lora_kernel)

    def _attention(self, qkv: torch.Tensor, step, cos, sin, layer: int) -> torch.Tensor:
        """cos, sin [T, head_dim] float32."""
        hd = self.layout.shape.head_dim
        nh, nkv = self.layout.local_heads, self.layout.local_kv_heads
        t = qkv.shape[0]
        if self.fused_ops:
            cache = self.kv_cache
            q = avx2.rope_store(qkv, nh, nkv, cos, sin, step.write_index, cache.view(layer, 0), cache.view(layer, 1))
            return step_attention(cache, layer, step, q)
        cos, sin = cos.to(self.dtype).unsqueeze(1), sin.to(self.dtype).unsqueeze(1)
        qk = qkv[:, : self.q_size + self.kv_size].view(t, nh + nkv, hd)
        qk = qk * cos + rotate_half(qk) * sin
        v = qkv[:, self.q_size + self.kv_size :].view(t, nkv, hd)
        write_kv(self.kv_cache, layer, step, qk[:, nh:], v)
        return step_attention(self.kv_cache, layer, step, qk[:, :nh])

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor):
        """(x + residual, its RMSNorm); the fused op adds in place."""
        if self.fused_ops:
            return x, avx2.add_rms_norm(x, None if residual is None else residual.contiguous(), weight, self.eps)
        x = x if residual is None else x + residual
        return x, rms_norm(x, weight, self.eps)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused_ops:
            return avx2.silu_mul(gate_up)
        return F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], all_logits: bool = False, copies=()) -> torch.Tensor:
        """Logits [num chunks, vocab] of each chunk's last token (or [T, vocab] with all_logits); `copies` as
        `StepPlan.copies`."""
        dev = self.device
        tokens = torch.tensor([t for c in chunks for t in c.tokens], device=dev)
        positions = torch.tensor([c.start + i for c in chunks for i in range(len(c.tokens))], device=dev)
        slot_ids = torch.tensor([c.slot for c in chunks for _ in c.tokens], device=dev, dtype=torch.int64)
        if not self.pool.slots or all(c.slot < 0 for c in chunks):
            slot_ids = None
        x = F.embedding(tokens, self.embed)
        cos, sin = self.rotary(positions)
        step = self.kv_cache.begin_step(chunks, self.layout.local_heads // self.layout.local_kv_heads, copies)
        qkv_offsets = [0, self.q_size, self.q_size + self.kv_size]
        x, h = self._add_norm(x, None, self.layers[0]["in_norm"])
        for i, L in enumerate(self.layers):
            qkv = self._lora(L["qkv"](h), h, slot_ids, i, QKV, qkv_offsets, "column")
            attn = self._attention(qkv, step, cos, sin, i)
            o = self._lora(L["o"](attn), attn, slot_ids, i, ("o_proj",), [0], "row")
            x, h = self._add_norm(x, self.comm.all_reduce(o, "base"), L["post_norm"])
            gu = self._lora(L["gate_up"](h), h, slot_ids, i, GATE_UP, [0, self.inter], "column")
            act = self._silu_mul(gu)
            d = self._lora(L["down"](act), act, slot_ids, i, ("down_proj",), [0], "row")
            following = self.layers[i + 1]["in_norm"] if i + 1 < len(self.layers) else self.norm
            x, h = self._add_norm(x, self.comm.all_reduce(d, "base"), following)
        last = torch.tensor([len(c.tokens) for c in chunks], device=dev).cumsum(0) - 1
        logits = self.lm_head(h if all_logits else h[last])
        if self.layout.world > 1:
            logits = self.comm.all_gather(logits, "base")[:, : self.vocab_size]
        logits = logits.float()
        finite = finite_rows(logits[last] if all_logits else logits).tolist()
        if not all(finite):  # a sequence whose cache may hold inf/NaN: its row is zeroed when it is freed
            self.kv_cache.mark_dirty(c.seq_id for c, ok in zip(chunks, finite) if not ok)
        return logits

"""The decode-step model behind `trtllm-bdlora project`: pure functions, no I/O.

One decode step of a TP-N Llama with `batch` sequences (one token each) splits into
  base_gemm   the four linear groups per layer (qkv, o, gate_up, down) and the LM head
  lora        the scheme's multi-adapter kernels (none: nothing)
  attention   reading each sequence's KV cache
  base_coll   two all-reduces per layer (after o and down), plus the logits all-gather of a parallel LM head
  lora_coll   S-LoRA only: all-gathers after the qkv and gate_up shrinks, all-reduces after the o and down shrinks
Compute follows the roofline (max of bytes / bandwidth and FLOPs / FLOP/s, with a per-kernel floor) unless
measured kernel times are given; collectives follow t = latency + bytes * factor / busbw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trtllm_bdlora.llama.shape import LINEAR_GROUPS, LlamaShape
from trtllm_bdlora.perf.presets import Collective, System, module_shapes

SCHEMES = ("none", "bdlora", "slora", "replicated")
CATEGORIES = ("base_gemm", "lora", "attention", "other", "base_coll", "lora_coll")
GROUPS = LINEAR_GROUPS


@dataclass(frozen=True)
class Workload:
    batch: int  # sequences per decode step (one token each)
    context: int  # KV-cache length per sequence
    rank: int  # LoRA rank of the slora / replicated adapters
    bd_rank: int  # rank of the BD-LoRA adapters (the paper compares BD-LoRA at about twice the LoRA rank)
    adapters: int  # distinct adapters in the batch
    dtype_bytes: int = 2
    kernel_floor_s: float = 0.0  # smallest time of one kernel launch


def lora_kernels(scheme: str, k: int, m: int, role: str, w: Workload, tp: int) -> list[tuple[str, int, int, int]]:
    """The per-rank LoRA kernels of one module: (kind, K, M, rank) with kind fused | shrink | expand."""
    if scheme == "none":
        return []
    if scheme == "bdlora":
        return [("fused", k, m, w.bd_rank // tp)]
    if scheme == "replicated":
        return [("fused", k, m, w.rank)]
    if role == "column":  # A split by rank: shrink r/N, all-gather, expand the full r into the local outputs
        return [("shrink", k, 0, w.rank // tp), ("expand", 0, m, w.rank)]
    return [("shrink", k, 0, w.rank), ("expand", 0, m // tp, w.rank)]  # all-reduce of x.A, B split by output


def lora_kernel_cost(kind: str, k: int, m: int, rank: int, w: Workload) -> tuple[float, float]:
    """(bytes, FLOPs) of one LoRA kernel on T = batch tokens reading `adapters` adapters' factors."""
    t, n, s = w.batch, min(w.adapters, w.batch), w.dtype_bytes
    if kind == "shrink":
        return s * (t * k + n * rank * k + t * rank), 2.0 * t * rank * k
    if kind == "expand":
        return s * (t * rank + n * rank * m + 2 * t * m), 2.0 * t * rank * m
    return s * (t * k + n * rank * (k + m) + 2 * t * m), 2.0 * t * rank * (k + m)


def roofline(nbytes: float, flops: float, system: System, floor_s: float = 0.0) -> float:
    return max(nbytes / system.mem_bw, flops / system.flops, floor_s)


def collective_time(kind: str, nbytes: float, n: int, c: Collective) -> float:
    """nccl-tests' convention: all_reduce moves 2(n-1)/n of the buffer, all_gather (n-1)/n of the output."""
    if n <= 1:
        return 0.0
    factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return c.latency_s + nbytes * factor / c.busbw_bytes_per_s


def step_collectives(shape: LlamaShape, tp: int, w: Workload, scheme: str, parallel_lm_head: bool) -> list[tuple]:
    """(kind, bytes, category, count per step) of every collective of one decode step."""
    if tp == 1:
        return []
    t, s, layers = w.batch, w.dtype_bytes, shape.num_layers
    out = [("all_reduce", t * shape.hidden_size * s, "base_coll", 2 * layers)]
    if parallel_lm_head:
        out.append(("all_gather", t * shape.vocab_size * s, "base_coll", 1))
    if scheme == "slora":
        r = w.rank
        out += [("all_gather", 3 * t * r * s, "lora_coll", layers), ("all_gather", 2 * t * r * s, "lora_coll", layers),
                ("all_reduce", t * r * s, "lora_coll", 2 * layers)]
    return out


KernelTimes = Callable[[str, str, int, int, int, int], "float | None"]  # (module, kind, T, K, M, rank) -> s or None


def compute_terms(shape: LlamaShape, tp: int, w: Workload, scheme: str, system: System,
                  kernel_times: KernelTimes | None = None, parallel_lm_head: bool = True) -> dict[str, float]:
    """Per-step compute (s) of one rank by category, from the roofline or measured kernel times."""
    mods = module_shapes(shape, tp)
    t, s, floor = w.batch, w.dtype_bytes, w.kernel_floor_s
    measured = kernel_times or (lambda *a: None)
    base = lora = 0.0
    for names in GROUPS.values():
        k = mods[names[0]][0]
        m = sum(mods[n][1] for n in names)
        gemms = [measured(n, "gemm", t, k, mods[n][1], 0) for n in names]  # measured per module, or the fused roofline
        base += sum(gemms) if None not in gemms else roofline(s * (k * m + t * k + t * m), 2.0 * t * k * m, system, floor)
        group_kernels: dict[str, float] = {}  # one launch per kernel kind per group: the op fuses a group's outputs
        for name in names:
            k_in, m_out, role = mods[name]
            for kind, kk, mm, rank in lora_kernels(scheme, k_in, m_out, role, w, tp):
                got = measured(name, kind, t, kk, mm, rank)
                group_kernels[kind] = group_kernels.get(kind, 0.0) + (
                    got if got is not None else roofline(*lora_kernel_cost(kind, kk, mm, rank, w), system))
        lora += sum(max(v, floor) for v in group_kernels.values())
    kv_local = max(1, shape.num_kv_heads // tp) * shape.head_dim
    heads_local = shape.num_heads // tp
    attention = roofline(s * w.batch * w.context * 2 * kv_local, 4.0 * w.batch * w.context * heads_local * shape.head_dim,
                         system, floor)
    vocab = shape.vocab_size // tp if parallel_lm_head else shape.vocab_size
    lm_head = roofline(s * (vocab * shape.hidden_size + t * shape.hidden_size), 2.0 * t * vocab * shape.hidden_size,
                       system, floor)
    layers = shape.num_layers
    return {"base_gemm": base * layers + lm_head, "lora": lora * layers, "attention": attention * layers, "other": 0.0}


def breakdown(compute: dict[str, float], collectives: list[tuple], system: System, tp: int,
              contention: float = 1.0, collective_fn: Callable | None = None) -> dict[str, float]:
    """Step time by category: compute terms times `contention` (ranks sharing cores), collectives from the system's
    latency-bandwidth constants (or `collective_fn(kind, bytes)`)."""
    out = {c: compute.get(c, 0.0) * contention for c in ("base_gemm", "lora", "attention", "other")}
    out["base_coll"] = out["lora_coll"] = 0.0
    for kind, nbytes, category, count in collectives:
        each = collective_fn(kind, nbytes) if collective_fn else collective_time(kind, nbytes, tp, system.collectives[kind])
        out[category] += count * each
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


def project(shape: LlamaShape, tp: int, w: Workload, system: System, kernel_times: KernelTimes | None = None,
            schemes: tuple[str, ...] = SCHEMES) -> dict[str, dict[str, float]]:
    """Per scheme: step-time breakdown (s) and `speedup_vs_slora`."""
    rows = {}
    for scheme in schemes:
        compute = compute_terms(shape, tp, w, scheme, system, kernel_times)
        rows[scheme] = breakdown(compute, step_collectives(shape, tp, w, scheme, True), system, tp)
    if "slora" in rows:
        for r in rows.values():
            r["speedup_vs_slora"] = rows["slora"]["total"] / r["total"]
    return rows

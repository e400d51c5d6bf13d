"""The engine's float32 CPU kernels for CPUs whose best vector unit is AVX2 (`avx2.c`): the base GEMM, the attention
of a step's tokens over their KV-cache rows, and a layer's small ops (RoPE with the cache write, residual add with
RMSNorm, SiLU-and-multiply). Built on first use with the system's C compiler into the cache directory, called
through ctypes (which releases the GIL while they run), on torch's intra-op thread count.

On such CPUs (AMD EPYC / Ryzen before Zen 4, Intel without AVX-512) oneDNN's float32 kernels stream a decode step's
weights well below memory speed, SDPA on a decode batch (a batched call on tiny matrices) costs more than reading
its K and V, and at decode size each small torch op costs more in dispatch than in work. One thread, AMD EPYC,
2026-12-07 10:33 UTC, `python benchmarks/cpu_kernels.py` (docs/performance.md, section 4): smollm2-135m's 121 base
weights (538 MB) against 8 rows 66.9 ms through oneDNN's prepacked linear and 35.8 ms here (streaming them takes
30 ms), 1 row 69.7 against 30.8 ms, 128 rows 458 against 393 ms; a layer's small ops at 8 rows 216 against 71 us.
The attention (blocked kernels, 2026-12-07 18:43 UTC): a decode step over 8 sequences of 190 tokens 626 against
344 us a layer, of 4096 tokens 7.6 against 3.7 ms; a 512-token prompt chunk after 3584 tokens 86 against 70 ms, a
160-token prompt 1.9 against 0.75 ms. Where the CPU has AVX-512, oneDNN and SDPA keep the work (not measured against
them here).
TRTLLM_BDLORA_CPU_KERNELS=torch|avx2 forces a choice (auto: the rule above). A CPU without AVX2 and FMA, or a machine
without a C compiler, gets torch's, with one warning saying why.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from trtllm_bdlora.llama.cache import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("avx2.c")
PANEL = 8  # output features per packed panel (avx2.c)
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
ENV = "TRTLLM_BDLORA_CPU_KERNELS"
CHOICES = ("auto", "torch", "avx2")
CHOICE = os.environ.get(ENV, "auto") or "auto"


def _capability() -> str:
    """torch's vector ISA for this CPU: DEFAULT, AVX2 (which it grants only with FMA) or AVX512."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_avx2() -> bool:
    """Whether this CPU runs the kernels at all (AVX2 and FMA; an AVX-512 CPU has both)."""
    return _capability() in ("AVX2", "AVX512")


def library_path() -> Path:
    """Where the built library lives: the cache directory, named by a hash of the source and the flags."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"avx2-{digest}.so"


def build() -> Path:
    """Compile the library into `library_path()` unless it is there (RuntimeError naming what failed); a container
    image calls this at build time, so that a read-only cache directory holds it."""
    target = library_path()
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # ranks may build at once: publish by rename
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if done.returncode:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            raise RuntimeError(f"{compiler} failed: {last}")
        os.replace(built, target)
    log.info("built the AVX2 float32 kernels: %s", target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel library, or None (warned once) where it cannot be had."""
    if CHOICE not in CHOICES:
        raise ValueError(f"{ENV}={CHOICE!r}: expected one of {', '.join(CHOICES)}")
    if CHOICE == "torch":
        return None
    if not cpu_has_avx2():
        if CHOICE == "avx2":
            log.warning("%s=avx2: this CPU has no AVX2 and FMA; using torch's kernels", ENV)
        return None
    if CHOICE == "auto" and _capability() == "AVX512":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as e:
        log.warning("the AVX2 float32 kernels could not be built (%s); using torch's, slower on this CPU", e)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.bdlora_pack_f32.argtypes = [pointer, pointer, size, size]
    lib.bdlora_gemm_f32.argtypes = [pointer, pointer, pointer, size, size, size, ctypes.c_int]
    lib.bdlora_cache_attention_f32.argtypes = [pointer, size, pointer, pointer, size, size, pointer, pointer, pointer,
                                               size, size, size, size, ctypes.c_float, pointer, size, ctypes.c_int]
    lib.bdlora_rope_store_f32.argtypes = [pointer, size, pointer, pointer, size, size, size, size, pointer, pointer,
                                          pointer]
    lib.bdlora_add_rms_norm_f32.argtypes = [pointer, pointer, pointer, pointer, size, size, ctypes.c_float]
    lib.bdlora_silu_mul_f32.argtypes = [pointer, size, pointer, size, size]
    return lib


def chosen() -> str:
    """Which float32 CPU kernels the engine runs, for its start-up log."""
    return ("kernels/avx2.c (AVX2 GEMM, attention, RoPE, RMSNorm, SiLU)" if _library() is not None
            else "torch's (oneDNN, SDPA)")


def layer_ops_usable(tensor: torch.Tensor, head_dim: int, *widths: int) -> bool:
    """Whether `rope_store`, `add_rms_norm` and `silu_mul` take a model of this dtype and device (`tensor`'s):
    `usable`, head_dim a multiple of 16 and the other widths (hidden, intermediate) of 8."""
    return head_dim % 16 == 0 and all(w % 8 == 0 for w in widths) and usable(tensor)


def usable(tensor: torch.Tensor) -> bool:
    """Whether these kernels take `tensor`'s work: a CPU float32 tensor, on a CPU they are chosen for."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and _library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W [n, k] as panels [ceil(n / 8), k, 8] (zero-padded); only `usable` weights."""
    n, k = weight.shape
    weight = weight.contiguous()
    packed = torch.empty(-(-n // PANEL), k, PANEL, dtype=torch.float32)
    _library().bdlora_pack_f32(weight.data_ptr(), packed.data_ptr(), n, k)
    return packed


def matmul(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [m, k] @ W.T for the W that `pack` gave `packed`: [m, n], on torch's intra-op thread count."""
    m, k = x.shape
    if k != packed.shape[1] or x.dtype != torch.float32:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} against a packed float32 weight of {packed.shape[1]} input features")
    x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        _library().bdlora_gemm_f32(x.data_ptr(), packed.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
    return y


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
                    lengths: torch.Tensor, out: torch.Tensor) -> None:
    """out[tokens[i]] = softmax(q[tokens[i]] K^T / sqrt(d)) V over keys 0..lengths[i]-1 of cache row rows[i], per
    query head (head h reads KV head h // (heads / kv_heads)): a decoding token has its whole sequence as keys, a
    prompt token the keys up to its own position. q [T, heads, d] (rows may be strided, heads and d not), k and v
    [rows, kv_heads, capacity, d] (the cache's views), out [T, heads * d]; float32 CPU tensors, d a multiple of 8."""
    heads, d = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    if not (q.stride(2) == 1 and q.stride(1) == d and k.stride() == v.stride() and k.stride(2) == d and k.stride(3) == 1
            and out.is_contiguous() and out.shape[1] == heads * d and heads % kv_heads == 0 and d % 8 == 0):
        raise ValueError("cache_attention: q, k, v or out not in the expected layout")
    if not (q.dtype == k.dtype == v.dtype == out.dtype == torch.float32):
        raise ValueError("cache_attention: float32 tensors only")
    index = (tokens, rows, lengths)
    if not all(t.dtype == torch.int64 and t.is_contiguous() for t in index):
        raise ValueError("cache_attention: tokens, rows and lengths must be contiguous int64 tensors")
    _library().bdlora_cache_attention_f32(
        q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
        *(t.data_ptr() for t in index), len(tokens), heads, kv_heads, d, d ** -0.5, out.data_ptr(), out.stride(0),
        torch.get_num_threads())


def rope_store(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
               slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """RoPE on qkv's [T, (heads + 2 kv_heads) * d] q and k heads (transformers' rotate_half form, cos and sin
    [T, d]); q rotated in place, returned as [T, heads, d]; token t's kv head g of k (rotated) and v stored at row
    slots[t * kv_heads + g] of the caches' [-1, d] views. The same bits as torch's ops."""
    t, d = qkv.shape[0], cos.shape[-1]
    width = (heads + 2 * kv_heads) * d
    if not (qkv.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype == torch.float32
            and qkv.shape[1] == width and qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
            and cos.shape == sin.shape == (t, d) and d % 16 == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and slots.dtype == torch.int64 and slots.is_contiguous() and slots.numel() == t * kv_heads):
        raise ValueError("rope_store: qkv, cos, sin, slots or the caches not in the expected layout")
    if t:
        _library().bdlora_rope_store_f32(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), t, heads,
                                         kv_heads, d, slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr())
    return qkv[:, : heads * d].view(t, heads, d)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += residual in place (when given), then RMSNorm of x with `weight`: [T, n] float32, n a multiple of 8."""
    t, n = x.shape
    if not (x.is_contiguous() and weight.is_contiguous() and weight.shape == (n,) and n % 8 == 0
            and x.dtype == weight.dtype == torch.float32
            and (residual is None or (residual.is_contiguous() and residual.shape == x.shape
                                      and residual.dtype == torch.float32))):
        raise ValueError("add_rms_norm: x, residual or weight not in the expected layout")
    h = torch.empty_like(x)
    if t:
        _library().bdlora_add_rms_norm_f32(x.data_ptr(), None if residual is None else residual.data_ptr(),
                                           weight.data_ptr(), h.data_ptr(), t, n, eps)
    return h


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 inter] (gate first): [T, inter] float32, inter a multiple of 8."""
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if not (gate_up.dtype == torch.float32 and gate_up.stride(1) == 1 and gate_up.shape[1] == 2 * inter
            and inter % 8 == 0):
        raise ValueError("silu_mul: gate_up not in the expected layout")
    out = gate_up.new_empty(t, inter)
    if t:
        _library().bdlora_silu_mul_f32(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), t, inter)
    return out

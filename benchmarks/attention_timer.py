"""The attention's share of an engine step, for the benchmarks that time decode steps."""

from __future__ import annotations

import time


def time_attention() -> dict[str, float]:
    """Wrap `TPLlama._attention` so that every call adds its seconds to the returned dict's "s" (reset it per step)."""
    import trtllm_bdlora.engine.llama as llama

    totals = {"s": 0.0}
    original = llama.TPLlama._attention

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        totals["s"] += time.perf_counter() - t0
        return out

    llama.TPLlama._attention = timed
    return totals

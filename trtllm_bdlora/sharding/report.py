"""`trtllm-bdlora inspect`: what an adapter is, and what each TP scheme costs per rank."""

from __future__ import annotations

from trtllm_bdlora.adapters.lora import Adapter
from trtllm_bdlora.llama.shape import LINEAR_GROUPS, LlamaShape, shape_from_adapter
from trtllm_bdlora.sharding import SCHEMES, bd_misfit, make_layout, shard_lora


def _slora_collectives(adapter: Adapter) -> int:
    """S-LoRA issues one collective per fused LoRA group per layer: qkv, o, gate_up, down."""
    names = set(adapter.target_modules)
    groups = [set(g) for g in LINEAR_GROUPS.values()]
    return sum(1 for g in groups if g & names)


def inspect_report(adapter: Adapter, tp: int | None = None, shape: LlamaShape | None = None) -> dict:
    modules = []
    for name in adapter.target_modules:
        keys = [k for k in adapter.modules if k[1] == name]
        f = adapter.modules[keys[0]]
        modules.append(
            {"name": name, "role": f.role, "block_diagonal": f.bd_factor, "layers": len(keys), "rank": f.rank}
        )
    report: dict = {
        "path": adapter.path,
        "kind": adapter.kind,
        "rank": adapter.rank,
        "nblocks": adapter.nblocks,
        "num_layers": adapter.num_layers,
        "params": adapter.num_params(),
        "dtype": str(adapter.stored_dtype).removeprefix("torch."),
        "modules": modules,
    }
    if tp is None:
        return report
    layout = make_layout(shape or shape_from_adapter(adapter), tp)
    reasons = sorted(
        {f"{name}: {why}" for (_, name), f in adapter.modules.items() if (why := bd_misfit(f, name, layout))}
    ) if tp > 1 else []
    if adapter.kind == "lora":
        reasons = ["plain LoRA adapter (no block-diagonal factor): served with the replicated scheme"]
    itemsize = adapter.stored_dtype.itemsize
    schemes = {}
    for scheme in SCHEMES:
        per_rank = [
            sum(shard_lora(f, name, layout, rank, scheme).num_params() for (_, name), f in adapter.modules.items())
            for rank in range(tp)
        ]
        schemes[scheme] = {
            "per_rank_params": per_rank,
            "per_rank_bytes": [p * itemsize for p in per_rank],
            "lora_collectives_per_layer": _slora_collectives(adapter) if scheme == "slora" and tp > 1 else 0,
        }
    report.update(tp=tp, comm_free=not reasons, reasons=reasons, schemes=schemes)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"adapter   {report['path']}",
        f"kind      {report['kind']}   rank {report['rank']}   nblocks {report['nblocks']}   "
        f"layers {report['num_layers']}   params {report['params']:,} ({report['dtype']})",
        "modules:",
    ]
    for m in report["modules"]:
        bd = f"block-diagonal {m['block_diagonal']}" if m["block_diagonal"] else "dense"
        lines.append(f"  {m['name']:<10} {m['role']:<7} {bd:<17} rank {m['rank']}  x{m['layers']} layers")
    if "tp" in report:
        tp = report["tp"]
        lines.append(f"tp {tp}: comm_free = {str(report['comm_free']).lower()}")
        lines += [f"  why not: {r}" for r in report["reasons"]]
        lines.append(f"  {'scheme':<11}{'params/rank (max)':>18}{'bytes/rank (max)':>18}{'LoRA collectives/layer':>24}")
        for scheme, s in report["schemes"].items():
            lines.append(
                f"  {scheme:<11}{max(s['per_rank_params']):>18,}{max(s['per_rank_bytes']):>18,}"
                f"{s['lora_collectives_per_layer']:>24}"
            )
    return "\n".join(lines)

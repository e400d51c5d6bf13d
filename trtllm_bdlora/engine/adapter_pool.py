"""Per-rank adapter storage: a host cache of sharded adapters and a fixed number of device slots.

Slots are stacked buffers per (layer, module) in the multi-adapter op's layout:
`a [S, R, K_local]`, `b [S, M_local, R_b]`, `ranks [S]`, `scales [S]`. Loading an adapter into a slot
copies its shards; the least recently used slot not pinned by the running batch is evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from trtllm_bdlora.adapters.lora import Adapter
from trtllm_bdlora.errors import RequestError
from trtllm_bdlora.sharding import LoraShard, TPLayout, shard_adapter
from trtllm_bdlora.sharding.adapter import Scheme


@dataclass
class ModuleSlots:
    """Stacked slot buffers for one module of one layer on this rank."""

    a: torch.Tensor
    b: torch.Tensor
    ranks: torch.Tensor
    b_ranks: torch.Tensor
    scales: torch.Tensor
    out_offset: int = 0


def _slora_gather_layout(b: torch.Tensor, world: int, rank_cap: int) -> torch.Tensor:
    """Spread B's columns so they line up with an all-gather of per-rank buffers of width rank_cap."""
    m, r = b.shape
    per_rank = r // world
    out = b.new_zeros(m, world, rank_cap)
    out[:, :, :per_rank] = b.view(m, world, per_rank)
    return out.view(m, world * rank_cap)


class AdapterPool:
    def __init__(
        self,
        layout: TPLayout,
        rank: int,
        scheme: Scheme,
        max_loras: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.layout, self.tp_rank, self.scheme = layout, rank, scheme
        self.max_loras, self.dtype, self.device = max_loras, dtype, device
        self.host: dict[int, dict[tuple[int, str], LoraShard]] = {}
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # task id -> slot, LRU first
        self.slots: dict[tuple[int, str], ModuleSlots] = {}
        self.rank_cap = 0

    # host cache -------------------------------------------------------------
    def register(self, task_id: int, adapter: Adapter) -> None:
        self.host[task_id] = shard_adapter(adapter, self.layout, self.tp_rank, self.scheme)
        if task_id in self.slot_of:  # re-registration replaces the resident copy
            self._copy_in(self.slot_of[task_id], task_id)

    def unregister(self, task_id: int) -> None:
        """Forget an adapter; its slot, if it has one, becomes free. No running request may use it."""
        self.host.pop(task_id, None)
        self.slot_of.pop(task_id, None)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self.host

    # device slots -----------------------------------------------------------
    def _local_dims(self, name: str) -> tuple[int, int]:
        inp, out = self.layout.shape.module_dims(name)
        if name in ("o_proj", "down_proj"):
            return inp // self.layout.world, out
        return inp, self.layout.out_slice(name, 0).stop - self.layout.out_slice(name, 0).start

    def _allocate(self, rank_cap: int) -> None:
        old, self.rank_cap = self.slots, rank_cap
        self.slots = {}
        world = self.layout.world
        for layer in range(self.layout.shape.num_layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                k, m = self._local_dims(name)
                column = name not in ("o_proj", "down_proj")
                b_width = world * rank_cap if (self.scheme == "slora" and column) else rank_cap
                if self.scheme == "slora" and not column:
                    chunk = torch.tensor_split(torch.arange(m), world)[self.tp_rank]
                    m, offset = len(chunk), int(chunk[0]) if len(chunk) else 0
                else:
                    offset = 0
                S = self.max_loras
                self.slots[(layer, name)] = ModuleSlots(
                    a=torch.zeros(S, rank_cap, k, dtype=self.dtype, device=self.device),
                    b=torch.zeros(S, m, b_width, dtype=self.dtype, device=self.device),
                    ranks=torch.zeros(S, dtype=torch.int32, device=self.device),
                    b_ranks=torch.zeros(S, dtype=torch.int32, device=self.device),
                    scales=torch.zeros(S, dtype=torch.float32, device=self.device),
                    out_offset=offset,
                )
        if old:
            for task_id, slot in self.slot_of.items():
                self._copy_in(slot, task_id)

    def _copy_in(self, slot: int, task_id: int) -> None:
        world = self.layout.world
        for key, ms in self.slots.items():
            shard = self.host[task_id].get(key)
            ms.a[slot].zero_()
            ms.b[slot].zero_()
            if shard is None:
                ms.ranks[slot] = ms.b_ranks[slot] = 0
                continue
            r = shard.rank
            ms.a[slot, :r] = shard.a.to(self.dtype)
            if shard.collective == "all_gather":
                ms.b[slot] = _slora_gather_layout(shard.b.to(self.dtype), world, self.rank_cap)
                ms.b_ranks[slot] = ms.b.shape[2]
            else:
                ms.b[slot, :, : shard.b.shape[1]] = shard.b.to(self.dtype)
                ms.b_ranks[slot] = shard.b.shape[1]
            ms.ranks[slot] = r
            ms.scales[slot] = shard.scaling

    def load(self, task_id: int, slot: int) -> None:
        """Copy a registered adapter into a slot (the caller chose the slot: see `plan_slots`)."""
        need = max((s.rank for s in self.host[task_id].values()), default=0)
        if need > self.rank_cap:
            self._allocate(need)
        for other, s in list(self.slot_of.items()):
            if s == slot:
                del self.slot_of[other]
        self._copy_in(slot, task_id)
        self.slot_of[task_id] = slot

    def plan_slots(self, task_ids: list[int | None]) -> list[tuple[int, int]]:
        """The (slot, task id) loads that make every adapter in `task_ids` resident, evicting the least
        recently used adapters not in `task_ids`. Decides only: every rank applies the loads with `load`."""
        wanted = list(dict.fromkeys(t for t in task_ids if t))
        if len(wanted) > self.max_loras:
            raise RequestError(f"batch uses {len(wanted)} adapters but only {self.max_loras} slots exist")
        for t in wanted:
            if t not in self.host:
                raise RequestError(f"unknown adapter {t}")
        used = set(self.slot_of.values())
        free = [s for s in range(self.max_loras) if s not in used]
        evictable = [t for t in self.slot_of if t not in wanted]
        loads = []
        for t in wanted:
            if t in self.slot_of:
                self.slot_of.move_to_end(t)
            else:
                loads.append((free.pop(0) if free else self.slot_of[evictable.pop(0)], t))
        return loads

    def assign(self, task_ids: list[int | None]) -> tuple[list[tuple[int, int]], list[int]]:
        """`plan_slots` plus each entry's slot once those loads are applied (-1 for no adapter)."""
        loads = self.plan_slots(task_ids)
        slot_of = dict(self.slot_of) | {t: s for s, t in loads}
        return loads, [slot_of[t] if t else -1 for t in task_ids]

"""Per-rank adapter storage: a bounded host cache of sharded adapters and a fixed number of device slots.

Host cache: every registered adapter's shards for this rank, in the pool's dtype, at most `host_cache_bytes`
(TensorRT-LLM's `lora_cache_host_memory_bytes`, default 1 GiB as its PeftCacheManagerConfig). Rank 0 decides
which least recently used adapters to evict (never a pinned one, never one a pending request uses) and every
rank applies the same evictions, so the ranks' caches always hold the same task ids. Each adapter's shards
live in one anonymous memory mapping of their own, so an eviction hands exactly those pages back to the OS
(in the C heap, adapters that come and go would fragment it and RSS would creep up).

Slots are stacked buffers per (layer, module) in the multi-adapter op's layout:
`a [S, R, K_local]`, `b [S, M_local, R_b]`, `ranks [S]`, `scales [S]`, with R = `max_lora_rank`, allocated
once at start-up and never grown. Loading an adapter into a slot copies its shards; the least recently used
slot not pinned by the running batch is evicted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import math
import mmap
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from trtllm_bdlora.adapters.lora import Adapter
from trtllm_bdlora.errors import AdapterCacheFullError, AdapterError, RequestError
from trtllm_bdlora.llama.shape import LLAMA_MODULES, module_role
from trtllm_bdlora.sharding import LoraShard, TPLayout, shard_adapter
from trtllm_bdlora.sharding.adapter import Scheme

DEFAULT_HOST_CACHE_BYTES = 1 << 30
DEFAULT_MAX_LORA_RANK = 64

Shards = dict[tuple[int, str], LoraShard]


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


def shards_nbytes(shards: Shards) -> int:
    return sum(s.a.nbytes + s.b.nbytes for s in shards.values())


def _mapped_copies(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Contiguous copies of `tensors` in `dtype`, all in one anonymous mapping that is unmapped when the last
    of them is freed."""
    numels = [t.numel() for t in tensors]
    itemsize = torch.empty((), dtype=dtype).element_size()
    flat = torch.frombuffer(mmap.mmap(-1, max(1, sum(numels)) * itemsize), dtype=dtype, count=max(1, sum(numels)))
    out, start = [], 0
    for t, n in zip(tensors, numels):
        view = flat[start : start + n].view(t.shape)
        view.copy_(t)
        out.append(view)
        start += n
    return out


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed since (evicted adapters, request buffers) back to the OS: glibc keeps freed blocks in its
    arenas, so without a trim RSS would not drop. A no-op without glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20


def bound_heap_retention() -> None:
    """Serve blocks of 4 MiB and more (adapters sent with requests, their conversions) from their own mappings,
    returned to the OS when freed. glibc raises its mmap threshold after each large free (up to 32 MiB), after
    which such blocks land in the heap, fragment it, and RSS creeps up with every adapter registered; a fixed
    threshold stops that. Process-wide; a no-op without glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def host_cache_limits(host_cache_bytes: int, world: int, dtype: torch.dtype) -> tuple[int, str]:
    """The most adapter values the host cache of every rank can hold together, and that budget in words (for
    refusals of a safetensors header or request weights declaring more)."""
    budget = f"--lora-cache-host-bytes {host_cache_bytes} on each of {world} rank{'s' if world > 1 else ''}"
    return host_cache_bytes * world // dtype.itemsize, budget


def check_adapter_limits(adapter: Adapter, max_lora_rank: int) -> None:
    """Refuse, before sharding or allocating, an adapter whose rank exceeds the cap or whose scaling is not finite."""
    for (layer, name), f in adapter.modules.items():
        if f.rank > max_lora_rank:
            raise AdapterError(f"{adapter.path}: layer {layer} {name} has rank {f.rank}, over --max-lora-rank {max_lora_rank}")
        if not math.isfinite(f.scaling):
            raise AdapterError(f"{adapter.path}: layer {layer} {name} has a non-finite scaling ({f.scaling})")


def _check_representable(where: str, shard: LoraShard, dtype: torch.dtype) -> None:
    """Scaling and factors must fit the serving dtype (scales are kept in float32), and so must B * scaling."""
    limit = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)
    b_max = float(shard.b.abs().max()) if shard.b.numel() else 0.0
    a_max = float(shard.a.abs().max()) if shard.a.numel() else 0.0
    if abs(shard.scaling) > limit or abs(shard.scaling) * b_max > limit or a_max > limit or b_max > limit:
        raise AdapterError(f"{where}: scaling {shard.scaling:g} (with factors up to {max(a_max, b_max):g}) overflows {dtype}")


class AdapterPool:
    def __init__(
        self,
        layout: TPLayout,
        rank: int,
        scheme: Scheme,
        max_loras: int,
        dtype: torch.dtype,
        device: torch.device,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES,
    ):
        self.layout, self.tp_rank, self.scheme = layout, rank, scheme
        self.max_loras, self.dtype, self.device = max_loras, dtype, device
        self.max_lora_rank, self.host_cache_bytes = max_lora_rank, host_cache_bytes
        self.host: OrderedDict[int, Shards] = OrderedDict()  # task id -> shards, least recently used first
        self.host_nbytes: dict[int, int] = {}
        self.pinned: set[int] = set()
        self.versions: dict[int, int] = {}  # task id -> a number no other stored copy of any adapter had
        self._next_version = itertools.count(1)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # task id -> slot, LRU first
        self.slots: dict[tuple[int, str], ModuleSlots] = {}
        self.rank_cap = max_lora_rank
        self._allocate()

    # host cache -------------------------------------------------------------
    @property
    def host_bytes_used(self) -> int:
        return sum(self.host_nbytes.values())

    def prepare(self, adapter: Adapter) -> Shards:
        """Validate an adapter against the limits and shard it for this rank: copies in the pool's dtype, in one
        mapping of their own (never views that would keep the whole adapter alive). Touches no pool state."""
        check_adapter_limits(adapter, self.max_lora_rank)
        views = shard_adapter(adapter, self.layout, self.tp_rank, self.scheme)
        for key, shard in views.items():
            _check_representable(f"{adapter.path}: layer {key[0]} {key[1]}", shard, self.dtype)
        copies = iter(_mapped_copies([t for shard in views.values() for t in (shard.a, shard.b)], self.dtype))
        return {key: replace(shard, a=next(copies), b=next(copies)) for key, shard in views.items()}

    def insert(self, task_id: int, shards: Shards, pinned: bool = False) -> None:
        """Store prepared shards (replacing a previous copy); no eviction here: see `plan_evictions`."""
        self.host.pop(task_id, None)
        self.host[task_id] = shards
        self.host_nbytes[task_id] = shards_nbytes(shards)
        self.versions[task_id] = next(self._next_version)
        if pinned:
            self.pinned.add(task_id)
        if task_id in self.slot_of:  # re-registration replaces the resident copy
            self._copy_in(self.slot_of[task_id], task_id)

    def register(self, task_id: int, adapter: Adapter, pinned: bool = False) -> None:
        self.insert(task_id, self.prepare(adapter), pinned)

    def plan_evictions(self, task_id: int, nbytes: int, in_use: set[int]) -> list[int]:
        """Rank 0: the least recently used adapters to evict so that `nbytes` more fit the host cache, skipping
        pinned ones and those in `in_use` (adapters of requests not yet finished). Decides only: every rank
        applies the list with `evict`."""
        if nbytes > self.host_cache_bytes:
            raise RequestError(f"lora_task_id {task_id} needs {nbytes} bytes per rank, more than the whole host LoRA "
                               f"cache ({self.host_cache_bytes} bytes, --lora-cache-host-bytes)")
        free = self.host_cache_bytes - self.host_bytes_used
        victims = []
        for t in self.host:
            if free >= nbytes:
                break
            if t not in self.pinned and t not in in_use and t != task_id:
                victims.append(t)
                free += self.host_nbytes[t]
        if free < nbytes:
            raise AdapterCacheFullError(
                f"PEFT Cache is full. Could not store taskId={task_id}: {self.host_bytes_used} of "
                f"{self.host_cache_bytes} bytes per rank are held by pinned adapters or unfinished requests"
            )
        return victims

    def evict(self, task_ids: list[int]) -> None:
        for t in task_ids:
            self.host.pop(t, None)
            self.host_nbytes.pop(t, None)
            self.pinned.discard(t)
            self.versions.pop(t, None)
            self.slot_of.pop(t, None)  # its slot becomes free
        if task_ids:
            release_freed_memory()

    def touch(self, task_id: int) -> None:
        """Mark an adapter as just used (LRU order of the host cache)."""
        self.host.move_to_end(task_id)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self.host

    def version(self, task_id: int | None) -> int | None:
        """Which stored copy of the adapter `task_id` is (0: the base model; None: not stored): KV computed with one
        copy is reused only while the same copy serves (an unloaded id may come back with other weights)."""
        return 0 if task_id is None else self.versions.get(task_id)

    # device slots -----------------------------------------------------------
    def _local_dims(self, name: str) -> tuple[int, int]:
        inp, out = self.layout.shape.module_dims(name)
        if module_role(name) == "row":
            return inp // self.layout.world, out
        return inp, self.layout.out_slice(name, 0).stop - self.layout.out_slice(name, 0).start

    def _allocate(self) -> None:
        rank_cap, world = self.rank_cap, self.layout.world
        for layer in range(self.layout.shape.num_layers):
            for name in LLAMA_MODULES:
                k, m = self._local_dims(name)
                column = module_role(name) == "column"
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
            ms.a[slot, :r] = shard.a
            if shard.collective == "all_gather":
                ms.b[slot] = _slora_gather_layout(shard.b, world, self.rank_cap)
                ms.b_ranks[slot] = ms.b.shape[2]
            else:
                ms.b[slot, :, : shard.b.shape[1]] = shard.b
                ms.b_ranks[slot] = shard.b.shape[1]
            ms.ranks[slot] = r
            ms.scales[slot] = shard.scaling

    def load(self, task_id: int, slot: int) -> None:
        """Copy a registered adapter into a slot (the caller chose the slot: see `plan_slots`)."""
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

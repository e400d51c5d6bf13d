"""One rank's engine: base shard, adapter pool, model. Rank 0 plans steps; every rank executes them."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.lora import adapter_from_wire, adapter_to_wire
from trtllm_bdlora.config import EngineConfig
from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.engine.adapter_pool import (
    DEFAULT_HOST_CACHE_BYTES,
    DEFAULT_MAX_LORA_RANK,
    AdapterPool,
    bound_heap_retention,
    host_cache_limits,
    release_freed_memory,
    shards_nbytes,
)
from trtllm_bdlora.engine.adapter_registry import AdapterRegistry
from trtllm_bdlora.engine.kv_cache import DEFAULT_KV_CACHE_BYTES, budget_from_bytes, kv_bytes_per_token
from trtllm_bdlora.engine.llama import TPLlama
from trtllm_bdlora.engine.plan import AdapterUpload, StepPlan
from trtllm_bdlora.errors import AdapterError, AdapterNotCachedError, RequestError
from trtllm_bdlora.kernels import avx2
from trtllm_bdlora.kernels.cpu_features import slow_dtype_note
from trtllm_bdlora.llama.loader import BaseModel, load_base_model
from trtllm_bdlora.logs import log_event
from trtllm_bdlora.sharding import make_layout

log = logging.getLogger("trtllm_bdlora.adapters")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_unique_adapter_ids(adapters) -> None:
    """Two `--adapter` flags with the same task id are an error (never "the last one wins")."""
    seen: dict[int, str] = {}
    for task_id, directory in adapters:
        if task_id in seen:
            raise AdapterError(f"--adapter: task id {task_id} given twice ({seen[task_id]} and {directory})")
        seen[task_id] = directory


class Engine:
    def __init__(
        self,
        comm: Comm,
        model: str | BaseModel,
        scheme: str = "bdlora",
        adapters: list[tuple[int, str]] = (),
        max_loras: int = 8,
        dtype: str = "float32",
        max_seq_len: int | None = None,
        max_lora_rank: int | None = None,
        lora_cache_host_bytes: int = DEFAULT_HOST_CACHE_BYTES,
        pin_adapters: bool = True,
        allow_request_adapters: bool = True,
        kv_cache_bytes: int | None = None,
        lora_kernel: str = "auto",
        prefix_caching: bool = True,
    ):
        self.comm = comm
        self.prefix_caching = prefix_caching  # rank 0's scheduler copies KV of shared prompt prefixes
        self.pin_adapters = pin_adapters
        bound_heap_retention()  # adapters come and go for as long as the process serves
        base = model if isinstance(model, BaseModel) else load_base_model(model, tp_rank=(comm.rank, comm.world))
        self.base = base
        self.tokenizer = base.tokenizer
        self.shape = base.shape
        self.layout = make_layout(self.shape, comm.world)
        torch_dtype = DTYPES[dtype]
        if comm.rank == 0 and (note := slow_dtype_note(torch_dtype, comm.device)):
            logging.getLogger("trtllm_bdlora.engine").warning(note)
        if comm.rank == 0 and comm.device.type == "cpu" and torch_dtype == torch.float32:
            logging.getLogger("trtllm_bdlora.engine").info("float32 CPU kernels: %s", avx2.chosen())
        max_lora_rank = max_lora_rank or (base.build or {}).get("max_lora_rank") or DEFAULT_MAX_LORA_RANK
        self.pool = AdapterPool(self.layout, comm.rank, scheme, max_loras, torch_dtype, comm.device,
                                max_lora_rank, lora_cache_host_bytes)
        self.registry = AdapterRegistry(comm.world, allow_request_adapters)  # rank 0's: what each id means
        limit = getattr(base.config, "max_position_embeddings", 4096)
        self.max_seq_len = min(limit, max_seq_len or limit)
        per_token = kv_bytes_per_token(self.shape.num_layers, self.layout.local_kv_heads, self.shape.head_dim, torch_dtype)
        self.kv_budget = budget_from_bytes(kv_cache_bytes or DEFAULT_KV_CACHE_BYTES, per_token, self.max_seq_len)
        self.model = TPLlama(base.config, base.state_dict, self.layout, comm, self.pool, scheme, torch_dtype, comm.device,
                             self.kv_budget, presharded=base.build is not None, lora_kernel=lora_kernel)
        self.drop_base_weights()  # the model holds its own (packed) copies now
        base = self.base
        eos = base.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._worked = False  # since the last idle plan: then freed memory goes back to the OS
        self.in_collective = False  # rank 0: a plan is out to the workers and not yet executed here
        self._add_startup_adapters(list(adapters))

    def _add_startup_adapters(self, adapters: list[tuple[int, str]]) -> None:
        """`--adapter ID=DIR`: rank 0 reads each directory once and uploads the adapter to every rank, as every
        adapter is added (`add_adapter`); the other ranks execute one plan per adapter."""
        check_unique_adapter_ids(adapters)
        for task_id, directory in adapters:
            if self.comm.rank != 0:
                self.execute(self.receive())
                continue
            started = time.monotonic()
            adapter = load_peft_adapter(directory, **self.adapter_limits())
            shards = self.pool.prepare(adapter)
            total = self.pool.host_bytes_used + shards_nbytes(shards)
            if total > self.pool.host_cache_bytes:
                raise AdapterError(f"the --adapter adapters take {total} bytes per rank, more than "
                                   f"--lora-cache-host-bytes {self.pool.host_cache_bytes}")
            self.registry.bind_directory(task_id, adapter, "--adapter")
            self.add_adapter(task_id, adapter, self.pin_adapters, set(self.pool.host), shards, source="--adapter",
                             started=started)

    def adapter_limits(self) -> dict:
        """`load_peft_adapter`'s bounds for this engine: a header declaring a module beyond the base model's shape
        or --max-lora-rank, or more values than the host cache of every rank holds, is refused before reading."""
        max_elements, budget = host_cache_limits(self.pool.host_cache_bytes, self.comm.world, self.pool.dtype)
        return {"model_shape": self.shape, "max_lora_rank": self.pool.max_lora_rank, "max_elements": max_elements,
                "budget": budget}

    def drop_base_weights(self) -> None:
        """The loaded (unpacked) base weights go once the model holds its own packed copies (a caller that passed a
        BaseModel in frees them by dropping its own reference)."""
        self.base = dataclasses.replace(self.base, state_dict={})
        release_freed_memory()

    # rank 0: adding adapters ------------------------------------------------------
    def add_adapter(self, task_id: int, adapter, pinned: bool, in_use: set[int] = frozenset(), shards=None,
                    source: str = "request", started: float | None = None) -> int:
        """Rank 0: the one way an adapter reaches the ranks. Validated and sharded here first (a malformed adapter
        never reaches the workers); least recently used adapters that are neither pinned nor in `in_use` (the
        adapters of unfinished requests) make room; then one plan uploads it to every rank in the wire format.
        `source` (--adapter, request, load) and `started` (when reading it began) are for the log line."""
        started = time.monotonic() if started is None else started
        self._worked = True
        shards = self.pool.prepare(adapter) if shards is None else shards
        evict = self.pool.plan_evictions(task_id, shards_nbytes(shards), in_use)
        meta, flat = adapter_to_wire(adapter)
        self.lead(StepPlan(evict=evict, uploads=[AdapterUpload(task_id, pinned, meta)]), [(flat, shards)])
        for old in evict:
            log_event(log, "adapter evicted", task_id=old, reason="lru", **{"for": task_id})
        where = {} if source == "request" else {"dir": adapter.path}
        log_event(log, "adapter registered", task_id=task_id, source=source, **where, bytes=shards_nbytes(shards),
                  pinned=pinned, host_bytes_used=self.pool.host_bytes_used, seconds=round(time.monotonic() - started, 2))
        return shards_nbytes(shards)

    def admit_adapter(self, task_id: int | None, weights=None, config=None, in_use: set[int] = frozenset()) -> None:
        """Rank 0, before a request is scheduled: make its adapter available, as TensorRT-LLM's PEFT cache does.
        A cached id is marked used; an unknown (or evicted) id without weights is refused with upstream's error;
        weights for an id are checked against what the id means (the registry), and those of an id not cached are
        converted, validated and added on every rank."""
        self._worked = True
        if task_id is None:
            if weights is not None or config is not None:
                raise RequestError("lora_weights sent without a lora_task_id")
            return
        if weights is None or config is None:
            if task_id not in self.pool:
                raise AdapterNotCachedError(task_id)
            self.pool.touch(task_id)
            return
        from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm, check_request_adapter

        limits = self.adapter_limits()
        limits.pop("budget")
        where = f"lora_task_id {task_id}"
        check_request_adapter(weights, config, self.shape, limits["max_lora_rank"], limits["max_elements"], where,
                              self.layout.world)
        digest = self.registry.check_request(task_id, weights, config)
        if task_id in self.pool:
            self.pool.touch(task_id)
            return
        adapter = adapter_from_trtllm(weights, config, self.shape, self.layout.world, where,
                                      max_rank=limits["max_lora_rank"], max_elements=limits["max_elements"])
        self.add_adapter(task_id, adapter, pinned=False, in_use=in_use)
        self.registry.bind_request(task_id, digest, self.pool.host)

    def load_adapter(self, task_id: int, adapter, in_use: set[int] = frozenset()) -> None:
        """Rank 0: an adapter read from a PEFT directory at run time (the OpenAI API's load), held as the
        `--adapter` ones: pinned unless --no-pin-adapters."""
        self.registry.bind_directory(task_id, adapter, "load")
        self.add_adapter(task_id, adapter, pinned=self.pin_adapters, in_use=in_use, source="load")

    # every rank ------------------------------------------------------------------
    def execute(self, plan: StepPlan, uploads: list | None = None) -> torch.Tensor | None:
        """Run one planned step: evict, add uploaded adapters, free finished sequences, load slots, forward.
        Rank 0 passes each upload's (flat factors, shards it already prepared); the other ranks receive the
        factors and shard them the same way. The first empty plan (a heartbeat: the server is idle) after some
        work trims the heap."""
        if plan.empty:
            if self._worked:
                release_freed_memory()
                self._worked = False
            return None
        self._worked = True
        self.pool.evict(plan.evict)
        for i, upload in enumerate(plan.uploads):
            flat, shards = uploads[i] if uploads else (None, None)
            flat = self.comm.broadcast_tensor(flat, [upload.meta["numel"]], torch.float32)
            if shards is None:
                shards = self.pool.prepare(adapter_from_wire(upload.meta, flat))
            del flat
            self.pool.insert(upload.task_id, shards, upload.pinned)
        for seq_id in plan.free:
            self.model.free(seq_id)
        for slot, task_id in plan.loads:
            self.pool.load(task_id, slot)
        if not plan.chunks:
            return None
        return self.model.forward(plan.chunks, all_logits=plan.all_logits, copies=plan.copies)

    def receive(self) -> StepPlan | None:
        """Worker ranks: rank 0's next plan (None: stop)."""
        obj = self.comm.broadcast_json()
        return None if obj is None else StepPlan.from_json(obj)

    def follow(self) -> None:
        """Worker ranks: execute rank 0's plans until it broadcasts None."""
        while (plan := self.receive()) is not None:
            self.comm.log.clear()  # only rank 0 reads the accounting (per step); here it would only grow
            self.execute(plan)
        self.comm.stop_watch()  # rank 0 said stop: its heartbeat ends with it

    def lead(self, plan: StepPlan | None, uploads: list | None = None) -> torch.Tensor | None:
        """Rank 0: send a plan to the workers and execute it (`uploads`: see `execute`); None stops them.
        `in_collective` stays set if this raises: the ranks may then disagree on what ran."""
        if plan is None:
            self.comm.stop_watch()  # the workers leave after this plan: their heartbeats end
        self.in_collective = True
        self.comm.broadcast_json(None if plan is None else plan.to_json())
        out = None if plan is None else self.execute(plan, uploads)
        self.in_collective = False
        return out


def engine_from_config(config: EngineConfig, comm: Comm) -> Engine:
    """This rank's engine; a set-up error (bad adapter or model) raises on every rank that meets it, and the
    launcher reports it once. Rank 0 logs the phases with their durations (each adapter on a line of its own)."""
    from trtllm_bdlora.logs import phase

    quiet = comm.rank != 0
    with phase("loading weights", quiet, model=config.model, rank=comm.rank, tp=comm.world):
        base = load_base_model(config.model, tp_rank=(comm.rank, comm.world))
    with phase("building the engine", quiet, adapters=len(config.adapters)):
        engine = Engine(comm, base, config.scheme, [(a.task_id, a.directory) for a in config.adapters], config.max_loras,
                      config.dtype, max_lora_rank=config.max_lora_rank, lora_cache_host_bytes=config.lora_cache_host_bytes,
                      pin_adapters=config.pin_adapters, allow_request_adapters=config.allow_request_adapters,
                      kv_cache_bytes=config.kv_cache_bytes, lora_kernel=config.lora_kernel,
                      prefix_caching=config.enable_prefix_caching)
    del base  # the engine's model holds its own packed copies: the loaded weights go (they doubled each rank's memory)
    release_freed_memory()
    return engine

"""One rank's engine: base shard, adapter pool, model. Rank 0 plans steps; every rank executes them."""

from __future__ import annotations

import logging

import torch

from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.distributed.comm import Comm
from trtllm_bdlora.engine.adapter_pool import (
    DEFAULT_HOST_CACHE_BYTES,
    DEFAULT_MAX_LORA_RANK,
    AdapterPool,
    bound_heap_retention,
    release_freed_memory,
    shards_nbytes,
)
from trtllm_bdlora.engine.adapter_registry import AdapterOwners
from trtllm_bdlora.engine.llama import SeqChunk, TPLlama
from trtllm_bdlora.errors import AdapterError, AdapterNotCachedError, RequestError
from trtllm_bdlora.llama.loader import BaseModel, load_base_model
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


def check_launch(args) -> None:
    """What can be refused before any rank starts, as one line: duplicate adapter ids, an unknown interface, a
    model that is not there, a TP its heads do not divide, a torch build made for another TP, an adapter that
    is invalid, does not fit the model or exceeds --max-lora-rank."""
    from trtllm_bdlora.distributed.launch import interface_address
    from trtllm_bdlora.engine.adapter_pool import check_adapter_limits
    from trtllm_bdlora.llama.loader import load_model_config, read_build_info, resolve_model_dir

    check_unique_adapter_ids(args.adapter)
    interface_address(args.comm_interface)
    build = read_build_info(resolve_model_dir(args.model), args.tp)  # also dequantises the embedded model, once
    shape = load_model_config(args.model)
    make_layout(shape, args.tp)
    if args.tp > 1:  # at TP 1 the engine loads them next, with the same one-line errors
        max_lora_rank = args.max_lora_rank or (build or {}).get("max_lora_rank") or DEFAULT_MAX_LORA_RANK
        for _, directory in args.adapter:
            check_adapter_limits(load_peft_adapter(directory, model_shape=shape), max_lora_rank)


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
    ):
        self.comm = comm
        self.pin_adapters = pin_adapters
        bound_heap_retention()  # adapters come and go for as long as the process serves
        base = model if isinstance(model, BaseModel) else load_base_model(model, tp_rank=(comm.rank, comm.world))
        self.base = base
        self.tokenizer = base.tokenizer
        self.shape = base.shape
        self.layout = make_layout(self.shape, comm.world)
        torch_dtype = DTYPES[dtype]
        max_lora_rank = max_lora_rank or (base.build or {}).get("max_lora_rank") or DEFAULT_MAX_LORA_RANK
        self.pool = AdapterPool(self.layout, comm.rank, scheme, max_loras, torch_dtype, comm.device,
                                max_lora_rank, lora_cache_host_bytes)
        check_unique_adapter_ids(adapters)
        self.owners = AdapterOwners(allow_request_adapters)  # rank 0 decides who may send weights for an id
        for task_id, directory in adapters:
            adapter = load_peft_adapter(directory, model_shape=self.shape)
            self.register(task_id, adapter, pinned=pin_adapters)
            if comm.rank == 0:
                self.owners.add_startup(task_id, adapter, comm.world)
                log.info("adapter registered task_id=%d source=--adapter dir=%s pinned=%s host_bytes_used=%d",
                         task_id, directory, pin_adapters, self.pool.host_bytes_used)
        if self.pool.host_bytes_used > lora_cache_host_bytes:
            raise AdapterError(f"the --adapter adapters take {self.pool.host_bytes_used} bytes per rank, more than "
                               f"--lora-cache-host-bytes {lora_cache_host_bytes}")
        self.model = TPLlama(base.config, base.state_dict, self.layout, comm, self.pool, scheme, torch_dtype, comm.device,
                             presharded=base.build is not None)
        limit = getattr(base.config, "max_position_embeddings", 4096)
        self.max_seq_len = min(limit, max_seq_len or limit)
        eos = base.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._worked = False  # since the last idle plan: then freed memory goes back to the OS
        self.in_collective = False  # rank 0: a plan is out to the workers and not yet executed here

    def register(self, task_id: int, adapter, pinned: bool = False) -> None:
        """Every rank, same order: add an adapter to the host cache (no eviction: start-up and plans)."""
        self.pool.register(task_id, adapter, pinned)

    # rank 0: adapters that requests name or carry ---------------------------------
    def admit_adapter(self, task_id: int | None, weights=None, config=None, in_use: set[int] = frozenset()) -> None:
        """Rank 0, before a request is scheduled: make its adapter available, as TensorRT-LLM's PEFT cache does.
        A cached id is marked used; an unknown (or evicted) id without weights is refused with upstream's error;
        weights with an unknown id are validated and registered on every rank, evicting least recently used
        adapters that are neither pinned nor in `in_use` (the adapters of requests not yet finished)."""
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
        digest = self.owners.check(task_id, weights, config)  # weights for an id bound to others: refused
        if task_id in self.pool:
            self.pool.touch(task_id)
            return
        self._register_request_adapter(task_id, weights, config, in_use)
        self.owners.bind(task_id, digest, self.pool)

    def _register_request_adapter(self, task_id: int, weights, config, in_use: set[int]) -> None:
        import numpy as np

        from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm

        # validate fully on rank 0 first: a malformed adapter must never reach the workers
        adapter = adapter_from_trtllm(weights, config, self.shape, self.layout.world, f"lora_task_id {task_id}",
                                      max_rank=self.pool.max_lora_rank)
        shards = self.pool.prepare(adapter)
        evict = self.pool.plan_evictions(task_id, sum(s.a.nbytes + s.b.nbytes for s in shards.values()), in_use)
        w = torch.from_numpy(np.array(weights, dtype=np.float32))  # copies: request arrays are read-only views
        c = torch.from_numpy(np.array(config, dtype=np.int32))
        entry = {"task_id": task_id, "w_shape": list(w.shape), "c_shape": list(c.shape)}
        self.lead({"evict": evict, "register": [entry]}, [(w, c, shards)])
        for old in evict:
            log.info("adapter evicted task_id=%d reason=lru for=%d", old, task_id)
        log.info("adapter registered task_id=%d source=request bytes=%d host_bytes_used=%d",
                 task_id, sum(s.a.nbytes + s.b.nbytes for s in shards.values()), self.pool.host_bytes_used)

    def register_shared(self, task_id: int, adapter, in_use: set[int] = frozenset()) -> None:
        """Rank 0: register an adapter loaded from a PEFT directory at run time (the OpenAI API's
        load_lora_adapter) on every rank, as the `--adapter` ones: pinned unless --no-pin-adapters. Validated and
        sharded here first; least recently used adapters that are neither pinned nor in `in_use` make room."""
        from trtllm_bdlora.adapters.lora import adapter_to_wire

        self._worked = True
        shards = self.pool.prepare(adapter)
        evict = self.pool.plan_evictions(task_id, shards_nbytes(shards), in_use)
        meta, flat = adapter_to_wire(adapter)
        self.lead({"evict": evict, "share": [dict(meta, task_id=task_id, pinned=self.pin_adapters)]}, [(shards, flat)])

    def _register_from_plan(self, plan: dict, arrays: list | None) -> None:
        """Adapters sent with requests (TensorRT-LLM format). Rank 0 passes (weights, config, shards) it already
        validated and prepared; the other ranks receive the arrays and convert them the same way."""
        from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm

        for i, entry in enumerate(plan.get("register", [])):
            w, c, shards = arrays[i] if arrays else (None, None, None)
            w = self.comm.broadcast_tensor(w, entry["w_shape"], torch.float32)
            c = self.comm.broadcast_tensor(c, entry["c_shape"], torch.int32)
            if shards is None:
                adapter = adapter_from_trtllm(w.numpy(), c.numpy(), self.shape, self.layout.world,
                                              f"task {entry['task_id']}", max_rank=self.pool.max_lora_rank)
                shards = self.pool.prepare(adapter)
            del w, c
            self.pool.insert(entry["task_id"], shards)

    def _share_from_plan(self, plan: dict, arrays: list | None) -> None:
        """Adapters rank 0 loaded from a PEFT directory at run time (`register_shared`). Rank 0 passes (shards,
        flat factors) it already prepared; the other ranks receive the factors and shard them the same way."""
        from trtllm_bdlora.adapters.lora import adapter_from_wire

        for i, meta in enumerate(plan.get("share", [])):
            shards, flat = arrays[i] if arrays else (None, None)
            flat = self.comm.broadcast_tensor(flat, [meta["numel"]], torch.float32)
            if shards is None:
                shards = self.pool.prepare(adapter_from_wire(meta, flat))
            del flat
            self.pool.insert(meta["task_id"], shards, meta["pinned"])

    def execute(self, plan: dict, arrays: list | None = None) -> torch.Tensor | None:
        """Run one planned step: evict, register sent adapters, free finished sequences, load slots, forward.
        The first empty plan (a heartbeat: the server is idle) after some work trims the heap."""
        if not plan:
            if self._worked:
                release_freed_memory()
                self._worked = False
            return None
        self._worked = True
        self.pool.evict(plan.get("evict", []))
        self._register_from_plan(plan, arrays)  # a plan carries `register` or `share` entries, not both
        self._share_from_plan(plan, arrays)
        for seq_id in plan.get("free", []):
            self.model.free(seq_id)
        for slot, task_id in plan.get("loads", []):
            self.pool.load(task_id, slot)
        chunks = [SeqChunk(*c) for c in plan.get("chunks", [])]
        if not chunks:
            return None
        return self.model.forward(chunks, all_logits=plan.get("all_logits", False))

    def follow(self) -> None:
        """Worker ranks: execute rank 0's plans until it broadcasts None."""
        while (plan := self.comm.broadcast_json()) is not None:
            self.comm.log.clear()  # only rank 0 reads the accounting (per step); here it would only grow
            self.execute(plan)

    def lead(self, plan: dict | None, arrays: list | None = None) -> torch.Tensor | None:
        """Rank 0: send a plan (and the arrays of adapters it registers) to the workers and execute it;
        None stops them. `in_collective` stays set if this raises: the ranks may then disagree on what ran."""
        self.in_collective = True
        self.comm.broadcast_json(plan)
        out = None if plan is None else self.execute(plan, arrays)
        self.in_collective = False
        return out


def engine_from_args(args, comm: Comm) -> Engine:
    """This rank's engine from the CLI's engine flags; a set-up error (bad adapter or model) raises on every rank
    that meets it, and the launcher reports it once."""
    return Engine(comm, args.model, args.scheme, args.adapter, args.max_loras, args.dtype,
                  max_lora_rank=args.max_lora_rank, lora_cache_host_bytes=args.lora_cache_host_bytes,
                  pin_adapters=args.pin_adapters, allow_request_adapters=getattr(args, "allow_request_adapters", True))

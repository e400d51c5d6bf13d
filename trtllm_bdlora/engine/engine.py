"""One rank's engine: base shard, adapter pool, model. Rank 0 plans steps; every rank executes them."""

from __future__ import annotations

import torch

from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.engine.adapter_pool import AdapterPool
from trtllm_bdlora.engine.comm import Comm
from trtllm_bdlora.engine.llama import SeqChunk, TPLlama
from trtllm_bdlora.models.loader import BaseModel, load_base_model
from trtllm_bdlora.sharding import make_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    ):
        self.comm = comm
        base = model if isinstance(model, BaseModel) else load_base_model(model)
        self.base = base
        self.tokenizer = base.tokenizer
        self.shape = base.shape
        self.layout = make_layout(self.shape, comm.world)
        torch_dtype = DTYPES[dtype]
        self.pool = AdapterPool(self.layout, comm.rank, scheme, max_loras, torch_dtype, comm.device)
        for task_id, directory in adapters:
            self.register(task_id, load_peft_adapter(directory, model_shape=self.shape))
        self.model = TPLlama(base.config, base.state_dict, self.layout, comm, self.pool, scheme, torch_dtype, comm.device)
        limit = getattr(base.config, "max_position_embeddings", 4096)
        self.max_seq_len = min(limit, max_seq_len or limit)
        eos = base.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def register(self, task_id: int, adapter) -> None:
        self.pool.register(task_id, adapter)

    def _register_from_plan(self, plan: dict, arrays: list | None) -> None:
        """Adapters sent with requests (TensorRT-LLM format). Rank 0 passes (weights, config, adapter) it already
        validated and converted; the other ranks receive the arrays and convert them the same way."""
        from trtllm_bdlora.adapters.trtllm_format import adapter_from_trtllm

        for i, entry in enumerate(plan.get("register", [])):
            w, c, adapter = arrays[i] if arrays else (None, None, None)
            w = self.comm.broadcast_tensor(w, entry["w_shape"], torch.float32)
            c = self.comm.broadcast_tensor(c, entry["c_shape"], torch.int32)
            if adapter is None:
                adapter = adapter_from_trtllm(w.numpy(), c.numpy(), self.shape, self.layout.world, f"task {entry['task_id']}")
            self.register(entry["task_id"], adapter)

    def _share_from_plan(self, plan: dict, adapters: list | None) -> None:
        """Adapters rank 0 loaded itself (a PEFT directory, at run time): rank 0 passes (Adapter, flat factors from
        `adapter_to_wire`), the other ranks receive them whole; then adapters rank 0 retired leave every rank."""
        from trtllm_bdlora.adapters.lora import adapter_from_wire

        for i, meta in enumerate(plan.get("share", [])):
            adapter, flat = adapters[i] if adapters else (None, None)
            flat = self.comm.broadcast_tensor(flat, [meta["numel"]], torch.float32)
            self.register(meta["task_id"], adapter or adapter_from_wire(meta, flat))
        for task_id in plan.get("unregister", []):
            self.pool.unregister(task_id)

    def execute(self, plan: dict, arrays: list | None = None) -> torch.Tensor | None:
        """Run one planned step: register sent adapters, free finished sequences, load slots, forward.
        `arrays` belong to the plan's `register` or `share` entries (a plan carries one of them)."""
        self._register_from_plan(plan, arrays)
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
            self.execute(plan)

    def lead(self, plan: dict | None, arrays: list | None = None) -> torch.Tensor | None:
        """Rank 0: send a plan (and the arrays of adapters it registers) to the workers and execute it;
        None stops them."""
        self.comm.broadcast_json(plan)
        return None if plan is None else self.execute(plan, arrays)


def engine_from_args(args, comm: Comm) -> Engine | None:
    """This rank's engine from the CLI's engine flags. A set-up error (bad adapter or model) raises on rank 0,
    which reports it; other ranks get None and exit quietly."""
    from trtllm_bdlora.errors import BdLoraError

    try:
        return Engine(comm, args.model, args.scheme, args.adapter, args.max_loras, args.dtype)
    except BdLoraError:
        if comm.rank == 0:
            raise
        return None

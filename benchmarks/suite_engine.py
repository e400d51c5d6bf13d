"""Engine part of the GPU suite: the torch engine on one device against PEFT, and decode step time per scheme.

TP 2 and 4 run with every rank on the one device: NCCL refuses two ranks on one GPU, so the ranks are threads of
this process joined by an in-process group (ThreadComm) that implements the engine's collectives exactly (sum in
rank order, concatenation) and records them like the real one. Those step times serialize the ranks on one device,
so only TP 1's are decode-step figures.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from trtllm_bdlora.distributed.comm import Comm

PROMPTS = [[5, 17, 3, 99, 42, 7, 1], [8, 8, 200, 31], [11, 12, 13, 14, 15, 16, 17, 18, 19], [250, 3, 77]]


class ThreadGroup:
    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world


class ThreadComm(Comm):
    """Collectives between threads of one process (every rank on one device)."""

    def __init__(self, group: ThreadGroup, rank: int, device: torch.device):
        super().__init__(rank, group.world, device)
        self.group = group

    def _exchange(self, value, combine):
        g = self.group
        g.slots[self.rank] = value
        g.barrier.wait()
        out = combine(list(g.slots))  # every rank combines all values in rank order before anyone moves on
        g.barrier.wait()
        return out

    def all_reduce(self, t: torch.Tensor, category: str = "base") -> torch.Tensor:
        if self.world > 1:
            self.log.record("all_reduce", t, category)
            total = self._exchange(t, lambda vals: torch.stack(vals).sum(0))
            t.copy_(total)
        return t

    def all_gather(self, t: torch.Tensor, category: str = "lora") -> torch.Tensor:
        if self.world == 1:
            return t
        self.log.record("all_gather", t, category)
        return self._exchange(t.contiguous(), lambda vals: torch.cat(vals, dim=-1))

    def broadcast_json(self, obj=None):
        if self.world == 1:
            return obj
        return self._exchange(obj, lambda vals: json.loads(json.dumps(vals[0])))

    def broadcast_tensor(self, t, shape, dtype):
        if self.world == 1:
            return t
        return self._exchange(t, lambda vals: vals[0].to(dtype).clone().cpu())


_launch_lock = threading.Lock()


def _serialize_kernel_launches() -> None:
    """Triton's first-call compilation is not thread-safe: ranks launch the kernel one at a time."""
    from trtllm_bdlora.kernels import multi_lora

    if getattr(multi_lora.launch, "serialized", False):
        return
    launch = multi_lora.launch

    def locked(*args, **kwargs):
        with _launch_lock:
            return launch(*args, **kwargs)

    locked.serialized = True
    multi_lora.launch = locked


def run_ranks(world: int, device: str, body) -> list:
    """body(comm) on `world` threads; returns each rank's result (re-raises the first error)."""
    if world > 1:
        _serialize_kernel_launches()
    group, results, errors = ThreadGroup(world), [None] * world, []

    def target(rank: int):
        try:
            results[rank] = body(ThreadComm(group, rank, torch.device(device)))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _peft_logits(model_dir: Path, adapters: dict[int, Path], device: str) -> dict:
    """Per (adapter, prompt) logits from PEFT's PeftModel: the independent reference."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir).to(device), adapters[1], adapter_name="1")
    for task, d in adapters.items():
        if task != 1:
            model.load_adapter(d, adapter_name=str(task))
    model.eval()
    ref = {}
    with torch.no_grad():
        for task in [None, *adapters]:
            for i, prompt in enumerate(PROMPTS):
                ids = torch.tensor([prompt], device=device)
                if task is None:
                    with model.disable_adapter():
                        ref[(task, i)] = model(ids).logits[0].float().cpu()
                else:
                    model.set_adapter(str(task))
                    ref[(task, i)] = model(ids).logits[0].float().cpu()
    return ref


def _engine_logits(base, adapters: dict[int, Path], scheme: str, tp: int, device: str, requests: list) -> torch.Tensor:
    from trtllm_bdlora.engine.engine import Engine
    from trtllm_bdlora.engine.plan import SeqChunk, StepPlan

    def body(comm):
        engine = Engine(comm, base, scheme, [(t, str(d)) for t, d in adapters.items()], max_loras=4)
        if comm.rank != 0:
            engine.follow()
            return None
        loads, slots = engine.pool.assign(requests)
        chunks = [SeqChunk(i, p, 0, s) for i, (p, s) in enumerate(zip(PROMPTS, slots))]
        logits = engine.lead(StepPlan(loads=loads, chunks=chunks, all_logits=True))
        engine.lead(None)
        return logits.float().cpu()

    return run_ranks(tp, device, body)[0]


def correctness(device: str, smoke: bool, workdir: Path) -> list[dict]:
    """Mixed-adapter batch (BD-LoRA adapters, a plain LoRA, a request without adapter) through the engine at TP 1, 2
    and 4 for every scheme, against PEFT per request."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import make_peft_adapter, make_tiny_llama
    from trtllm_bdlora.llama.loader import load_base_model

    hidden, layers = (64, 2) if smoke else (512, 4)
    model_dir = make_tiny_llama(workdir / "model", heads=8, kv_heads=4, hidden=hidden, layers=layers, vocab=256)
    adapters = {1: make_peft_adapter(model_dir, workdir / "bd1", seed=1, r=16, nblocks=4),
                2: make_peft_adapter(model_dir, workdir / "bd2", seed=2, r=8, nblocks=4),
                3: make_peft_adapter(model_dir, workdir / "lora", seed=3, r=12, nblocks=None)}
    ref = _peft_logits(model_dir, adapters, device)
    base = load_base_model(str(model_dir))
    requests = [1, 2, None, 3]
    checks = []
    for tp in (1, 2, 4):
        for scheme in ("bdlora", "slora", "replicated"):
            logits, t0, worst = _engine_logits(base, adapters, scheme, tp, device, requests), 0, 0.0
            for i, (prompt, task) in enumerate(zip(PROMPTS, requests)):
                want = ref[(task, i)]
                got = logits[t0 : t0 + len(prompt)]
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
                t0 += len(prompt)
            checks.append({"check": f"engine tp{tp} {scheme} == PEFT", "max_rel_err": worst, "ok": worst < 1e-3})
    return checks


def _random_base(shape_cfg: dict, device: str, dtype: torch.dtype):
    """A random Llama BaseModel built directly on the device (no checkpoint needed)."""
    from transformers import LlamaConfig

    from trtllm_bdlora.llama.loader import BaseModel

    cfg = LlamaConfig(**shape_cfg, max_position_embeddings=4096, tie_word_embeddings=False)
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    gen = torch.Generator(device=device).manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * shape[-1] ** -0.5).to(dtype)

    sd = {"model.embed_tokens.weight": w(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, device=device, dtype=dtype),
          "lm_head.weight": w(cfg.vocab_size, h)}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        sd |= {p + "input_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
               p + "post_attention_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
               p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
               p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
               p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h), p + "mlp.down_proj.weight": w(h, i)}
    return BaseModel("random", cfg, sd, None)


def step_times(device: str, smoke: bool) -> list[dict]:
    """Decode step time per scheme (bench's interleaved measurement) at TP 1, 2, 4 on the one device."""
    from trtllm_bdlora.config import BenchConfig
    from trtllm_bdlora.perf.bench import _follow, _lead, make_report, setup_schemes

    if smoke:
        cfg, dtype, batch, steps = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                        num_key_value_heads=4, vocab_size=256), "float32", 4, 2
    else:  # Llama-3.1-8B's layer shapes, 4 layers (the whole model's 32 would only scale the per-layer terms)
        cfg, dtype, batch, steps = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256), "bfloat16", 16, 20
    base = _random_base(cfg, device, getattr(torch, dtype))
    reports = []
    for tp in (1, 2) if smoke else (1, 2, 4):
        config = BenchConfig(model=f"random llama ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']})",
                             tp=tp, batch=batch, prompt_len=32, steps=steps, num_adapters=4, rank=16, max_loras=8,
                             dtype=dtype)

        def body(comm, config=config):
            engine, pools = setup_schemes(comm, base, max_loras=config.max_loras, dtype=config.dtype,
                                          max_lora_rank=config.max_lora_rank, num_adapters=config.num_adapters,
                                          rank=config.rank)
            if comm.rank != 0:
                _follow(engine, pools)
                return None
            return make_report(config, comm, _lead(engine, pools, config, [1 + i % 4 for i in range(config.batch)]))

        report = run_ranks(tp, device, body)[0]
        report["note"] = "decode step" if tp == 1 else "ranks serialized on one device: not a TP step time"
        reports.append(report)
    return reports


def run_engine(device: str, smoke: bool) -> dict:
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        checks = correctness(device, smoke, Path(tmp))
    return {"checks": checks, "step_times": step_times(device, smoke), "seconds": time.time() - t0}


def markdown(engine: dict) -> str:
    lines = ["## Engine on one device", "", "| check | max relative error | ok |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['max_rel_err']:.2e} | {c['ok']} |" for c in engine["checks"]]
    lines += ["", "| TP | scheme | step ms (median) | p25-p75 | LoRA collectives / step | note |", "|---|---|---|---|---|---|"]
    for rep in engine["step_times"]:
        for scheme, r in rep["schemes"].items():
            lines.append(f"| {rep['tp']} | {scheme} | {r['median_ms']:.2f} | {r['p25_ms']:.2f}-{r['p75_ms']:.2f} | "
                         f"{r['lora_collectives']} | {rep['note']} |")
    return "\n".join(lines)

"""Run under `mpirun -n N`: mixed-adapter batches through the TP engine; rank 0 writes logits and tokens.

Usage: tp_worker.py MODEL_DIR OUT_DIR CASES_JSON
CASES_JSON: [{"name", "scheme", "adapters": [[id, dir], ...], "requests": [{"adapter", "prompt_ids"}],
              "max_num_tokens" (optional: a small step budget prefills the prompts in chunks)}]
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from tests.helpers import record_copies
from trtllm_bdlora.distributed.launch import init_ranks, mpi_world_size, shutdown
from trtllm_bdlora.engine.engine import Engine
from trtllm_bdlora.engine.generate import run_requests
from trtllm_bdlora.engine.plan import SeqChunk, StepPlan
from trtllm_bdlora.llama.loader import load_base_model


def run_case(comm, base, case, out_dir: Path) -> None:
    engine = Engine(comm, base, case["scheme"], [tuple(a) for a in case["adapters"]], max_loras=4)
    if comm.rank != 0:
        engine.follow()  # the prefill plan, then the generate run
        engine.follow()
        return
    reqs = case["requests"]
    loads, slots = engine.pool.assign([r["adapter"] for r in reqs])
    chunks = [SeqChunk(i, r["prompt_ids"], 0, slot) for i, (r, slot) in enumerate(zip(reqs, slots))]
    logits = engine.lead(StepPlan(loads=loads, chunks=chunks, all_logits=True))
    engine.lead(StepPlan(free=list(range(len(reqs)))))
    engine.lead(None)
    tensors, t0 = {}, 0
    for i, r in enumerate(reqs):
        n = len(r["prompt_ids"])
        tensors[f"req{i}"] = logits[t0 : t0 + n].contiguous()
        t0 += n
    save_file(tensors, str(out_dir / f"{case['name']}.safetensors"))
    lines = [json.dumps({"id": i, "adapter": r["adapter"], "prompt_ids": r["prompt_ids"], "max_tokens": 16})
             for i, r in enumerate(reqs)]
    copies = record_copies(engine)  # prefix caching's copies (sequence ids are the requests' indices here)
    results = run_requests(engine, lines, max_batch_size=8, stats=True, max_num_tokens=case.get("max_num_tokens"))
    engine.lead(None)
    (out_dir / f"{case['name']}.json").write_text(json.dumps(results))
    (out_dir / f"{case['name']}.copies.json").write_text(json.dumps(copies))


def main() -> None:
    model_dir, out_dir, cases = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    comm = init_ranks(mpi_world_size() or 1, "cpu")
    base = load_base_model(model_dir)
    try:
        for case in cases:
            run_case(comm, base, case, out_dir)
    finally:
        shutdown(comm)


if __name__ == "__main__":
    main()

"""`docker/smoke.sh`: the first end-to-end check inside the container on a GPU node, in one command.

Builds (if needed) the plugin, makes a tiny random Llama with a BD-LoRA and a plain LoRA adapter (PEFT), builds
TP-1 and (with 2+ GPUs) TP-2 BD-LoRA engines, serves each with Triton (`launch-triton`), sends the same greedy
requests through tritonclient and through `trtllm-bdlora generate --backend torch`, compares the token ids and
prints one verdict line. Outside the container it refuses at once with one line. Its command line:
`trtllm_bdlora/cli/smoke.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trtllm_bdlora.config import SmokeConfig

PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120, 64], [200, 3, 15, 16, 23, 42, 8, 99]]
ADAPTERS = {1: "bd", 2: "plain"}  # lora_task_id -> adapter
MAX_TOKENS = 12


def container_problems(can_import, which) -> list[str]:
    """Why this is not the trtllm-bdlora container (empty when it is)."""
    problems = [f"{m} is not importable" for m in ("tensorrt_llm", "tensorrt") if not can_import(m)]
    problems += [f"{tool} is not on PATH" for tool in ("tritonserver", "mpirun") if which(tool) is None]
    return problems


def verdict(expected: dict, got: dict) -> tuple[bool, list[str]]:
    """Compare token ids per (tp, request); returns (all equal, one line per mismatch)."""
    lines = [f"{key}: torch {expected[key]} vs triton {got.get(key)}" for key in sorted(expected)
             if got.get(key) != expected[key]]
    return not lines and bool(expected), lines


def requests() -> list[dict]:
    out = []
    for i, ids in enumerate(PROMPTS * 2):  # every prompt without adapter, with the BD-LoRA and with the plain LoRA
        adapter = [None, 1, 2][i % 3]
        out.append({"id": i, "adapter": adapter, "prompt_ids": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0})
    return out


def make_model_and_adapters(work: Path) -> tuple[Path, dict[int, Path]]:  # pragma: no cover - container only
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import BdLoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from trtllm_bdlora.llama.shape import COLUMN_MODULES, LLAMA_MODULES, ROW_MODULES

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init: logits far from ties in fp16
            p.normal_(0, 0.1 if p.dim() > 1 else 1.0)
    model_dir = work / "tiny-llama"
    model.save_pretrained(model_dir)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1").save_pretrained(model_dir)
    adapters = {}
    for task, kind in ADAPTERS.items():
        targets = list(LLAMA_MODULES)
        bd = BdLoraConfig(target_modules_bd_a=list(ROW_MODULES), target_modules_bd_b=list(COLUMN_MODULES), nblocks=2)
        peft = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), LoraConfig(
            r=8, lora_alpha=16, target_modules=targets, use_bdlora=bd if kind == "bd" else None, lora_dropout=0.0))
        gen = torch.Generator().manual_seed(task)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        adapters[task] = work / f"adapter-{kind}"
        peft.save_pretrained(adapters[task])
    return model_dir, adapters


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:  # pragma: no cover - container only
    print("+ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def torch_tokens(model_dir: Path, adapters: dict[int, Path], tp: int, work: Path) -> dict:  # pragma: no cover
    reqs = work / "requests.jsonl"
    reqs.write_text("".join(json.dumps(r) + "\n" for r in requests()))
    cmd = ["trtllm-bdlora", "generate", "--model", model_dir, "--tp", tp, "--backend", "torch", "--dtype", "float16",
           "--requests", reqs] + [a for task, d in adapters.items() for a in ("--adapter", f"{task}={d}")]
    out = run(cmd, capture_output=True, text=True).stdout
    return {(tp, r["id"]): r["output_ids"][:MAX_TOKENS] for r in map(json.loads, out.splitlines())}


def triton_tokens(url: str, converted: dict[int, tuple], tp: int) -> dict:  # pragma: no cover - container only
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from trtllm_bdlora.adapters.trtllm_format import weights_for_triton

    def tensor(name, array):
        t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        return t

    results, sent = {}, set()
    client = grpcclient.InferenceServerClient(url)
    for r in requests():
        ids = np.array([r["prompt_ids"]], np.int32)
        inputs = [tensor("input_ids", ids), tensor("input_lengths", np.array([[ids.shape[1]]], np.int32)),
                  tensor("request_output_len", np.array([[MAX_TOKENS]], np.int32)),
                  tensor("streaming", np.array([[False]], bool))]  # no end_id: the model has no EOS
        if r["adapter"]:
            inputs.append(tensor("lora_task_id", np.array([[r["adapter"]]], np.uint64)))
            if r["adapter"] not in sent:  # the first request for an adapter carries its weights, as in Triton
                weights, config = converted[r["adapter"]]
                inputs += [tensor("lora_weights", weights_for_triton(weights)), tensor("lora_config", config)]
                sent.add(r["adapter"])
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error, q=responses: q.put(error or result))
        client.async_stream_infer("tensorrt_llm", inputs, enable_empty_final_response=True)
        tokens = []
        while True:
            item = responses.get(timeout=120)
            if isinstance(item, Exception):
                raise RuntimeError(f"request {r['id']}: {item}")
            out = item.as_numpy("output_ids")
            if out is not None and out.size:
                length = int(item.as_numpy("sequence_length").reshape(-1)[0])
                seq = out.reshape(-1)[:length].tolist()
                tokens = seq[len(r["prompt_ids"]):] if seq[: len(r["prompt_ids"])] == r["prompt_ids"] else seq
            if item.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
        results[(tp, r["id"])] = tokens[:MAX_TOKENS]
    return results


def serve_and_query(engine: Path, model_dir: Path, converted: dict, tp: int, plugin: str, work: Path,
                    port: int) -> dict:  # pragma: no cover - container only
    import tritonclient.grpc as grpcclient

    repo = work / f"repo-tp{tp}"
    run(["trtllm-bdlora", "fill-model-repo", "--engine-dir", engine, "--tokenizer-dir", model_dir, "--output", repo,
         "--max-batch-size", 8, "--max-lora-rank", 32])
    server = subprocess.Popen(["trtllm-bdlora", "launch-triton", "--world-size", str(tp), "--model-repo", str(repo),
                               "--plugin-lib", plugin, "--grpc-port", str(port)], start_new_session=True)
    try:
        client, deadline = grpcclient.InferenceServerClient(f"127.0.0.1:{port}"), time.time() + 600
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"tritonserver (tp {tp}) did not become ready")
            time.sleep(2)
        return triton_tokens(f"127.0.0.1:{port}", converted, tp)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)


def smoke_main(config: SmokeConfig) -> int:
    problems = container_problems(lambda m: importlib.util.find_spec(m) is not None, shutil.which)
    if problems:
        print(f"smoke.sh: not inside the trtllm-bdlora container ({'; '.join(problems)}): run it there, e.g. "
              "`docker run --gpus all --rm trtllm-bdlora trtllm-bdlora-smoke`", file=sys.stderr)
        return 2
    return run_smoke(config)  # pragma: no cover - container only


def run_smoke(args: SmokeConfig) -> int:  # pragma: no cover - container only
    import torch

    from trtllm_bdlora.adapters import load_peft_adapter
    from trtllm_bdlora.adapters.trtllm_format import convert_adapter
    from trtllm_bdlora.trtllm.engine_dir import engine_lora_info
    from trtllm_bdlora.versions import require_pinned_stack

    require_pinned_stack()
    plugin = args.plugin_lib
    if not Path(plugin).is_file():
        src = Path(__file__).resolve().parents[2]
        run(["cmake", "-S", src / "plugins", "-B", src / "plugins" / "build", "-DCMAKE_BUILD_TYPE=Release"])
        run(["cmake", "--build", src / "plugins" / "build", "-j"])
        plugin = str(src / "plugins" / "build" / "libtrtllm_bdlora_plugin.so")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bdlora-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, adapters = make_model_and_adapters(work)
    tps = [1, 2] if torch.cuda.device_count() >= 2 else [1]
    expected, got = {}, {}
    for tp in tps:
        engine = work / f"engine-tp{tp}"
        build = ["trtllm-bdlora", "build", "--model", model_dir, "--tp", tp, "--output", engine, "--plugin-lib", plugin,
                 "--max-lora-rank", 32, "--max-batch-size", 8, "--max-input-len", 64, "--max-seq-len", 128,
                 "--overwrite"] + [a for d in adapters.values() for a in ("--adapter-dir", d)]
        run((["mpirun", "--allow-run-as-root", "-n", tp] if tp > 1 else []) + build)
        info = engine_lora_info(engine)
        converted = {task: convert_adapter(load_peft_adapter(d), info.tp, info.dtype, info.max_lora_rank)
                     for task, d in adapters.items()}
        expected.update(torch_tokens(model_dir, adapters, tp, work))
        got.update(serve_and_query(engine, model_dir, converted, tp, plugin, work, args.grpc_port))
    ok, lines = verdict(expected, got)
    for line in lines:
        print(f"mismatch {line}")
    skipped = "" if len(tps) == 2 else " (TP 2 skipped: needs 2 GPUs)"
    print(f"SMOKE {'PASS' if ok else 'FAIL'}: {len(expected) - len(lines)}/{len(expected)} requests equal at TP "
          f"{', '.join(map(str, tps))}{skipped}; work dir {work}", flush=True)
    return 0 if ok else 1

"""The production route's Triton side: fill `model_repo/` for a built engine, and launch one
`tritonserver` per rank under `mpirun` (leader mode) with the BD-LoRA plugin library preloaded."""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from trtllm_bdlora.errors import BdLoraError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "model_repo"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
DEFAULTS = {
    "triton_max_batch_size": "64",
    "decoupled_mode": "true",
    "max_queue_delay_microseconds": "0",
    "max_queue_size": "0",
    "batch_scheduler_policy": "max_utilization",
    "kv_cache_free_gpu_mem_fraction": "0.9",
    "lora_cache_optimal_adapter_size": "8",
    "lora_cache_max_adapter_size": "64",
    "lora_cache_gpu_memory_fraction": "0.05",
    "lora_cache_host_memory_bytes": str(1 << 30),
    "preprocessing_instance_count": "1",
    "postprocessing_instance_count": "1",
}
REQUIRED = ("engine_dir", "tokenizer_dir")


def fill_text(text: str, params: dict[str, str], where: str) -> str:
    missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in params})
    if missing:
        raise BdLoraError(f"{where}: no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: str(params[m.group(1)]), text)


def fill_model_repo(output: Path, params: dict[str, str], template: Path = TEMPLATE_DIR) -> Path:
    """Copy the template repository to `output` with every ${placeholder} filled."""
    values = {**DEFAULTS, **{k: str(v) for k, v in params.items() if v is not None}}
    for key in REQUIRED:
        if not values.get(key):
            raise BdLoraError(f"--{key.replace('_', '-')} is required")
    if output.resolve() == template.resolve():
        raise BdLoraError("--output must differ from the template repository")
    for src in sorted(template.rglob("*")):
        if src.is_dir() or src.name == "README.md" or "__pycache__" in src.parts:
            continue
        dst = output / src.relative_to(template)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.name == "config.pbtxt":
            dst.write_text(fill_text(src.read_text(), values, str(src.relative_to(template))))
        else:
            shutil.copyfile(src, dst)
    return output


def launch_command(world_size: int, model_repo: str, plugin_lib: str, grpc_port: int = 8001, http_port: int = 8000,
                   metrics_port: int = 8002, mpirun: str = "mpirun", tritonserver: str = "tritonserver",
                   as_root: bool = False) -> list[str]:
    """mpirun leader mode, as TensorRT-LLM's launch_triton_server.py: rank 0 serves every model; other ranks
    load only tensorrt_llm. LD_PRELOAD makes each rank's TensorRT see the BdLora plugin."""
    cmd = [mpirun] + (["--allow-run-as-root"] if as_root else [])
    for rank in range(world_size):
        cmd += ["-n", "1", "-x", f"LD_PRELOAD={plugin_lib}", tritonserver, f"--model-repository={model_repo}",
                "--disable-auto-complete-config", f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank == 0:
            cmd += [f"--grpc-port={grpc_port}", f"--http-port={http_port}", f"--metrics-port={metrics_port}"]
        else:
            cmd += ["--model-control-mode=explicit", "--load-model=tensorrt_llm", "--allow-http=false",
                    "--allow-grpc=false", "--allow-metrics=false"]
        cmd.append(":")
    return cmd[:-1]


def fill_main(args: argparse.Namespace) -> int:
    params = {"engine_dir": args.engine_dir, "tokenizer_dir": args.tokenizer_dir,
              "triton_max_batch_size": args.max_batch_size, "lora_cache_max_adapter_size": args.max_lora_rank}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BdLoraError(f"--set takes KEY=VALUE, got {item!r}")
        params[key] = value
    out = fill_model_repo(Path(args.output), params)
    print(f"wrote Triton model repository to {out}")
    return 0


def launch_main(args: argparse.Namespace) -> int:
    for tool in ("mpirun", "tritonserver"):
        if shutil.which(tool) is None:
            raise BdLoraError(f"{tool} not found: run inside the Triton TRT-LLM container (see docker/)")
    if not Path(args.plugin_lib).is_file():
        raise BdLoraError(f"{args.plugin_lib}: plugin library not found")
    if not (Path(args.model_repo) / "tensorrt_llm" / "config.pbtxt").is_file():
        raise BdLoraError(f"{args.model_repo}: not a filled model repository (run `trtllm-bdlora fill-model-repo`)")
    cmd = launch_command(args.world_size, args.model_repo, str(Path(args.plugin_lib).resolve()), args.grpc_port,
                         as_root=hasattr(os, "geteuid") and os.geteuid() == 0)
    print(" ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)
    return 0  # not reached

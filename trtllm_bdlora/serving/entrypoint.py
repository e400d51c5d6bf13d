"""The container's start-up: build engines if absent, fill the model repository, launch Triton.

Environment: MODEL (HF dir, required), TP (8), ENGINE_DIR (/engines), MODEL_REPO (/model_repo),
PLUGIN_LIB, MAX_LORA_RANK (64), MAX_BATCH_SIZE (64), DTYPE (float16), GRPC_PORT (8001), DRY_RUN (print only).
Arguments, if any, replace all of this with a command to run (e.g. `bash`).
Before anything runs, TensorRT-LLM and TensorRT must be the pinned versions (`trtllm_bdlora.versions`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEFAULT_PLUGIN = "/opt/trtllm-bdlora/lib/libtrtllm_bdlora_plugin.so"


def plan(env: dict[str, str], engines_exist: bool) -> list[list[str]]:
    model = env.get("MODEL")
    if not model:
        raise SystemExit("entrypoint: set MODEL to a Hugging Face Llama directory (mounted into the container)")
    tp = env.get("TP", "8")
    engine_dir = env.get("ENGINE_DIR", "/engines")
    repo = env.get("MODEL_REPO", "/model_repo")
    plugin = env.get("PLUGIN_LIB", DEFAULT_PLUGIN)
    steps = []
    if not engines_exist:
        build = ["trtllm-bdlora", "build", "--model", model, "--tp", tp, "--output", engine_dir, "--plugin-lib", plugin,
                 "--max-lora-rank", env.get("MAX_LORA_RANK", "64"), "--max-batch-size", env.get("MAX_BATCH_SIZE", "64"),
                 "--dtype", env.get("DTYPE", "float16"), "--overwrite"]
        steps.append(["mpirun", "--allow-run-as-root", "-n", tp] + build if int(tp) > 1 else build)
    steps.append(["trtllm-bdlora", "fill-model-repo", "--engine-dir", engine_dir, "--tokenizer-dir", model,
                  "--output", repo, "--max-batch-size", env.get("MAX_BATCH_SIZE", "64"),
                  "--max-lora-rank", env.get("MAX_LORA_RANK", "64")])
    steps.append(["trtllm-bdlora", "launch-triton", "--world-size", tp, "--model-repo", repo, "--plugin-lib", plugin,
                  "--grpc-port", env.get("GRPC_PORT", "8001")])
    return steps


def engines_exist(engine_dir: str, tp: int) -> bool:
    d = Path(engine_dir)
    return (d / "config.json").is_file() and all((d / f"rank{r}.engine").is_file() for r in range(tp))


def main(argv: list[str]) -> int:
    if argv:
        os.execvp(argv[0], argv)
    env = dict(os.environ)
    if not env.get("DRY_RUN"):
        from trtllm_bdlora.errors import BdLoraError
        from trtllm_bdlora.versions import require_pinned_stack

        try:
            require_pinned_stack()
        except BdLoraError as err:
            print(f"entrypoint: {err}", file=sys.stderr)
            return 2
    steps = plan(env, engines_exist(env.get("ENGINE_DIR", "/engines"), int(env.get("TP", "8"))))
    for step in steps:
        print("+ " + " ".join(step), flush=True)
        if env.get("DRY_RUN"):
            continue
        if step is steps[-1]:
            os.execvp(step[0], step)
        subprocess.run(step, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

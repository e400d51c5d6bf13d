"""The TensorRT-LLM route: `build` (per-rank engines, or torch shards), `convert-adapter` (TensorRT-LLM's request
format), `fill-model-repo` and `launch-triton` (production Triton with the BD-LoRA plugin)."""

from __future__ import annotations

from trtllm_bdlora.cli.flags import Flags, build, command
from trtllm_bdlora.cli.launching import Invocation
from trtllm_bdlora.config import (
    BACKENDS,
    DTYPES,
    BuildConfig,
    ConvertConfig,
    FillRepoConfig,
    LaunchTritonConfig,
)


def add_commands(sub) -> None:
    p = command(sub, "fill-model-repo", help="fill model_repo/ (Triton inflight_batcher_llm layout) for an engine",
                description="Write Triton's inflight_batcher_llm model repository (the five models' config.pbtxt, from "
                            "the same description `serve` answers with) for built engines.",
                configure=lambda ns: build(FillRepoConfig, ns, "fill"), run=run_fill)
    flags = Flags(p, FillRepoConfig, "fill")
    flags.add("--engine-dir", metavar="DIR", help="the engines `build` wrote")
    flags.add("--tokenizer-dir", metavar="DIR", help="the Hugging Face directory holding the tokenizer")
    flags.add("--output", metavar="DIR", help="the model repository to write")
    flags.add("--max-batch-size", type=int, help="triton_max_batch_size of every model")
    flags.add("--max-lora-rank", type=int, help="the engines' max_lora_rank (default: read from the engine directory, "
                                                "else 64)")
    flags.add("--tp", type=int, help="the engines' TP (default: read from the engine directory's bdlora_build.json)")
    flags.add("--set", field="settings", action="append", metavar="KEY=VALUE",
              help="any other ${placeholder} of the configs, e.g. lora_weights_data_type=TYPE_BF16; repeat for more")

    p = command(sub, "launch-triton", help="one tritonserver per rank under mpirun, BD-LoRA plugin preloaded (TensorRT "
                                           "engines); one tritonserver for a torch build",
                description="TensorRT engines: start one tritonserver per rank under mpirun (rank 0 serves every model, "
                            "the others only tensorrt_llm), each with the BD-LoRA plugin preloaded, inside the Triton "
                            "TRT-LLM container. The repository of a `build --backend torch` output: start one "
                            "tritonserver, whose Python-backend tensorrt_llm starts the engine's ranks itself.",
                configure=lambda ns: build(LaunchTritonConfig, ns, "launch"), run=run_launch)
    flags = Flags(p, LaunchTritonConfig, "launch")
    flags.add("--world-size", type=int, help="ranks of the TensorRT engines (the engines' TP)")
    flags.add("--model-repo", metavar="DIR", help="the filled model repository (fill-model-repo)")
    flags.add("--plugin-lib", metavar="FILE", help="the BD-LoRA TensorRT plugin library")
    flags.add("--grpc-port", type=int, help="rank 0's KServe v2 gRPC port")
    flags.add("--http-port", type=int, help="rank 0's KServe v2 HTTP port")
    flags.add("--metrics-port", type=int, help="rank 0's Prometheus metrics port")
    flags.add("--host", help="torch build: the address every endpoint binds to (default: Triton's)")
    flags.add("--tritonserver-arg", field="tritonserver_args", action="append", metavar="ARG",
              help="torch build: pass ARG to tritonserver; repeat for more")

    p = command(sub, "build", help="build one TensorRT-LLM engine per rank with BD-LoRA plugins (or torch shards)",
                description="trtllm: one TensorRT-LLM engine per TP rank with the LoRA plugin and the BD-LoRA plugin "
                            "(inside the pinned container; under mpirun -n N each rank builds its share). torch: "
                            "per-rank Megatron shards `serve --model` loads rank by rank. --max-lora-rank is the "
                            "engine's limit on every request's adapter rank: r for a BD-LoRA adapter, tp*r for a plain "
                            "LoRA (sent in BD-shaped form); --adapter-dir checks an adapter fits.",
                configure=lambda ns: build(BuildConfig, ns, "build"), run=run_build)
    flags = Flags(p, BuildConfig, "build")
    flags.add("--model", help="a Hugging Face Llama directory or smollm2-135m")
    flags.add("--tp", type=int, help="tensor-parallel ranks")
    flags.add("--output", metavar="DIR", help="the directory the engines (or shards) and bdlora_build.json go to")
    flags.add("--backend", choices=BACKENDS, help="trtllm engines, or torch shards")
    flags.add("--dtype", choices=DTYPES, help="the engine's compute type")
    flags.add("--max-lora-rank", type=int, help="largest adapter rank a request may carry")
    flags.add("--adapter-dir", field="adapter_dirs", action="append", metavar="DIR",
              help="a PEFT adapter this engine will serve: refuse the build if it cannot fit --max-lora-rank; repeat "
                   "for more")
    flags.add("--max-batch-size", type=int, help="the engine's max_batch_size")
    flags.add("--max-input-len", type=int, help="the engine's max_input_len")
    flags.add("--max-seq-len", type=int, help="the engine's max_seq_len (default: twice --max-input-len)")
    flags.add("--plugin-lib", metavar="FILE", help="the BD-LoRA TensorRT plugin library (trtllm)")
    flags.add("--overwrite", action="store_true", help="replace a non-empty --output")

    p = command(sub, "convert-adapter", help="PEFT adapter -> TensorRT-LLM lora_weights / lora_config .npy",
                description="Write a PEFT adapter (BD-LoRA or plain LoRA) as TensorRT-LLM's model.lora_weights.npy and "
                            "model.lora_config.npy, in the form BD-LoRA engines compute exactly: BD-LoRA blocks as "
                            "they are, plain LoRA modules in an equivalent rank-TP*r form; modules above the engine's "
                            "max_lora_rank are refused, by name.",
                configure=lambda ns: build(ConvertConfig, ns, "convert"), run=run_convert)
    flags = Flags(p, ConvertConfig, "convert")
    flags.add("adapter_dir", help="the PEFT adapter directory")
    flags.add("--output", metavar="DIR", help="where the two .npy files go")
    flags.add("--dtype", choices=DTYPES, help="the engine's dtype (default: the --engine-dir's, else float16); "
                                              "bfloat16 is stored as raw 2-byte values")
    flags.add("--tp", type=int, help="TP of the BD-LoRA engines (default: the --engine-dir's, else 1): plain LoRA "
                                     "modules are written in BD-shaped form of rank TP*r for it")
    flags.add("--max-lora-rank", type=int, help="the engine's max_lora_rank: refuse modules written with a larger rank")
    flags.add("--engine-dir", metavar="DIR", help="read TP, max_lora_rank and dtype from this engine directory")
    flags.add("--model", help="check shapes against this base model too")


def run_fill(config: FillRepoConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.trtllm.triton_repo import fill_main

    return fill_main(config)


def run_launch(config: LaunchTritonConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.trtllm.triton_repo import launch_main

    return launch_main(config)


def run_build(config: BuildConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.trtllm.build import main

    return main(config)


def run_convert(config: ConvertConfig, invocation: Invocation) -> int:
    from trtllm_bdlora.trtllm.convert import convert_main

    return convert_main(config)

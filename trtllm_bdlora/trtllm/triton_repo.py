"""The production route's Triton side: write the model repository for a built engine (config.pbtxt of the
five models from the interface description, with our Python models beside them), and launch one
`tritonserver` per rank under `mpirun` (leader mode) with the BD-LoRA plugin library preloaded."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from trtllm_bdlora.config import FillRepoConfig, LaunchTritonConfig
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.llama.shape import LlamaShape
from trtllm_bdlora.serving.repository.config import model_config
from trtllm_bdlora.serving.repository.spec import DEFAULTS, MODELS
from trtllm_bdlora.serving.repository.values import BUILD_RECORD, ENGINE_DTYPES, engine_values
from trtllm_bdlora.serving.repository.values import build_record as _build_record
from trtllm_bdlora.trtllm.engine_dir import EngineLoraInfo, engine_lora_info
from trtllm_bdlora.trtllm.prefetch import check_prefetch_dir

PYTHON_MODELS = "trtllm_bdlora.trtllm.python_models"  # one module per Python-backend model
REQUIRED = ("engine_dir", "tokenizer_dir", "tp_size")


def engine_shape(engine_dir: str) -> LlamaShape:
    """The base model's dimensions an engine directory records: `trtllm-bdlora build`'s bdlora_build.json, else
    TensorRT-LLM's config.json (pretrained_config)."""
    try:
        record = _build_record(engine_dir)
        if record:
            return LlamaShape(**record["shape"])
        pretrained = json.loads((Path(engine_dir) / "config.json").read_text())["pretrained_config"]
        heads = pretrained["num_attention_heads"]
        return LlamaShape(hidden_size=pretrained["hidden_size"], intermediate_size=pretrained["intermediate_size"],
                          num_layers=pretrained["num_hidden_layers"], num_heads=heads,
                          num_kv_heads=pretrained.get("num_key_value_heads") or heads,
                          head_dim=pretrained.get("head_size") or pretrained["hidden_size"] // heads,
                          vocab_size=pretrained.get("vocab_size", 0))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BdLoraError(f"{engine_dir}: cannot read the base model's dimensions ({type(err).__name__}: {err})") from None


def python_model_source(name: str) -> str:
    """The `<name>/1/model.py` fill-model-repo writes for a Python-backend model: one import of the model's code
    from the installed package, so a wheel carries it and an upgrade reaches it."""
    module = f"{PYTHON_MODELS}.{name}"
    return (f'"""Triton Python backend model `{name}`, written by `trtllm-bdlora fill-model-repo`: the code is\n'
            f'{module} in the installed package."""\n\nfrom {module} import TritonPythonModel  # noqa: F401\n')


def require_python_model(name: str) -> None:
    try:
        found = importlib.util.find_spec(f"{PYTHON_MODELS}.{name}") is not None
    except ModuleNotFoundError:  # the package holding the models is missing
        found = False
    if not found:
        import trtllm_bdlora

        raise BdLoraError(f"{name}: no Python model {PYTHON_MODELS}.{name} in the installed trtllm_bdlora "
                          f"({Path(trtllm_bdlora.__file__).parent}): reinstall the package")


def missing_files(repo: Path) -> list[str]:
    """What Triton needs and a model directory of `repo` lacks: config.pbtxt, version 1, model.py of Python models."""
    missing = []
    for name in MODELS:
        config = repo / name / "config.pbtxt"
        if not config.is_file():
            missing.append(str(config))
            continue
        if not (repo / name / "1").is_dir():
            missing.append(str(repo / name / "1"))
        if text_format.Parse(config.read_text(), mc.ModelConfig()).backend == "python" \
                and not (repo / name / "1" / "model.py").is_file():
            missing.append(str(repo / name / "1" / "model.py"))
    return missing


def engine_facts(engine_dir: str) -> tuple[LlamaShape, EngineLoraInfo] | None:
    """The engine's base-model dimensions and LoRA limits, None where its directory cannot be read here."""
    try:
        return engine_shape(engine_dir), engine_lora_info(engine_dir)
    except BdLoraError:
        return None


def fill_model_repo(output: Path, params: dict[str, str]) -> Path:
    """Write the repository: every model's config.pbtxt filled from `params` over the defaults (and what the
    engine directory records), a version directory for each, and each Python model's model.py."""
    values = {**DEFAULTS, **engine_values(params.get("engine_dir") or "")}
    values.update({k: str(v) for k, v in params.items() if v is not None})
    for key in REQUIRED:
        if not values.get(key):
            hint = f" (or build the engines with `trtllm-bdlora build`, which records it in {BUILD_RECORD})" \
                if key == "tp_size" else ""
            raise BdLoraError(f"--{key.replace('_size', '').replace('_', '-')} is required{hint}")
    if values["lora_weights_data_type"] not in ENGINE_DTYPES.values():
        raise BdLoraError(f"lora_weights_data_type must be one of {', '.join(ENGINE_DTYPES.values())} (the engine's "
                          f"dtype), got {values['lora_weights_data_type']!r}")
    prefetch = values.get("lora_prefetch_dir", "")
    if prefetch and Path(prefetch).is_dir():
        check_prefetch_dir(Path(prefetch), engine_facts(values["engine_dir"]))
    configs = {name: model_config(model, values) for name, model in MODELS.items()}
    for name, config in configs.items():
        if config.backend == "python":
            require_python_model(name)
    for name, config in configs.items():
        version = output / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if config.backend == "python":
            (version / "model.py").write_text(python_model_source(name))
        elif (version / "model.py").is_file():  # left by an earlier fill for a torch build: the C++ backend runs here
            (version / "model.py").unlink()
        (output / name / "config.pbtxt").write_text(
            "# Written by `trtllm-bdlora fill-model-repo` from trtllm_bdlora/serving/repository/spec.py.\n"
            + text_format.MessageToString(config))
    missing = missing_files(output)
    if missing:
        raise BdLoraError(f"{output}: incomplete after writing, missing {', '.join(missing)}")
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


def fill_main(args: FillRepoConfig) -> int:
    params = {"engine_dir": args.engine_dir, "tokenizer_dir": args.tokenizer_dir, "tp_size": args.tp,
              "triton_max_batch_size": args.max_batch_size, "lora_cache_max_adapter_size": args.max_lora_rank}
    for item in args.settings:
        key, _, value = item.partition("=")
        params[key] = value
    out = fill_model_repo(Path(args.output), params)
    print(f"wrote Triton model repository to {out}")
    prefetch = params.get("lora_prefetch_dir")
    if prefetch and not Path(prefetch).is_dir():
        print(f"note: lora_prefetch_dir {prefetch} is not a directory here, so its adapters were not checked "
              f"(Triton skips a directory that does not exist)")
    return 0


def repository_backend(model_repo: str) -> str:
    """The backend of a filled repository's `tensorrt_llm`: "tensorrtllm" (TensorRT engines) or "python" (torch build)."""
    path = Path(model_repo) / "tensorrt_llm" / "config.pbtxt"
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig()).backend
    except (OSError, text_format.ParseError) as err:
        raise BdLoraError(f"{path}: {err}") from None


def launch_main(args: LaunchTritonConfig) -> int:
    missing = missing_files(Path(args.model_repo))
    if missing:
        raise BdLoraError(f"{args.model_repo}: not a filled model repository, missing {', '.join(missing)} "
                          f"(run `trtllm-bdlora fill-model-repo`)")
    if repository_backend(args.model_repo) == "python":  # a torch build: one server; the model starts its own ranks
        from trtllm_bdlora.trtllm.local_triton import local_command

        cmd, env = local_command(args.model_repo, args.grpc_port, args.http_port, args.metrics_port, args.host,
                                 list(args.tritonserver_args))
        print(" ".join(cmd), flush=True)
        os.execvpe(cmd[0], cmd, env)
    if args.world_size is None:
        raise BdLoraError("--world-size is required for TensorRT-LLM engines (one tritonserver per rank)")
    for tool in ("mpirun", "tritonserver"):
        if shutil.which(tool) is None:
            raise BdLoraError(f"{tool} not found: run inside the Triton TRT-LLM container (see docker/)")
    if not Path(args.plugin_lib).is_file():
        raise BdLoraError(f"{args.plugin_lib}: plugin library not found")
    cmd = launch_command(args.world_size, args.model_repo, str(Path(args.plugin_lib).resolve()), args.grpc_port,
                         args.http_port, args.metrics_port, as_root=hasattr(os, "geteuid") and os.geteuid() == 0)
    print(" ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)
    return 0  # not reached

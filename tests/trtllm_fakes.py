"""Stand-ins for the container's `tensorrt` / `tensorrt_llm` packages, with just what our code touches: the version
check (installed as pip installs them, with their metadata), the Lora swap, and the build path of
`trtllm-bdlora build` (tensorrt_llm.build passes the LoRA config's target modules to `prepare_inputs` by name, as
tensorrt_llm/builder.py @ 008b2b8d does). Kept free of heavy imports: spawned processes import it."""

import textwrap
from pathlib import Path
from types import SimpleNamespace

from trtllm_bdlora.versions import TENSORRT_LLM_VERSION, TENSORRT_VERSION

FAKE_MODULES = ("tensorrt", "tensorrt_llm", "tensorrt_llm.layers", "tensorrt_llm.layers.lora", "tensorrt_llm._common",
                "tensorrt_llm._utils", "tensorrt_llm.functional", "tensorrt_llm.models", "tensorrt_llm.lora_helper",
                "tensorrt_llm.mapping", "tensorrt_llm.plugin")

FILES = {
    "tensorrt_llm/__init__.py": """
        import json
        import os

        __version__ = {trtllm_version!r}

        class BuildConfig:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        class Engine:
            def __init__(self, model):
                self.model = model
            def save(self, output_dir):
                with open(os.path.join(output_dir, f"rank{{self.model.config.mapping.rank}}.engine"), "w") as f:
                    json.dump({{"prepared_with": self.model.prepared_with,
                               "swapped": sorted(set(self.model.seen_at_prepare.values()))}}, f)

        def build(model, build_config):
            model.prepare_inputs(max_batch_size=build_config.max_batch_size,
                                 lora_target_modules=build_config.lora_config.lora_target_modules)
            return Engine(model)
        """,
    "tensorrt_llm/layers/__init__.py": "",
    "tensorrt_llm/layers/lora.py": """
        class Lora:
            def __init__(self, in_hidden_size=0, out_hidden_sizes=(0,), max_low_rank=0):
                self.in_hidden_size, self.out_hidden_sizes = in_hidden_size, list(out_hidden_sizes)
                self.max_low_rank = max_low_rank
        """,
    "tensorrt_llm/lora_helper.py": """
        from dataclasses import dataclass, field

        @dataclass
        class LoraConfig:  # the defaults of tensorrt_llm/lora_helper.py @ 037d4ba1
            lora_dir: list = field(default_factory=list)
            lora_ckpt_source: str = "hf"
            max_lora_rank: int = 64
            lora_target_modules: list = field(default_factory=list)
        """,
    "tensorrt_llm/mapping.py": """
        class Mapping:
            def __init__(self, world_size=1, rank=0, tp_size=1):
                self.world_size, self.rank, self.tp_size, self.tp_rank = world_size, rank, tp_size, rank % tp_size
        """,
    "tensorrt_llm/plugin.py": """
        class PluginConfig:
            lora_plugin = None
            remove_input_padding = True
            paged_kv_cache = None
        """,
    "tensorrt_llm/_common.py": "def default_net(): ...\ndef default_trtnet(): ...\n",
    "tensorrt_llm/_utils.py": "def str_dtype_to_trt(dtype): ...\n",
    "tensorrt_llm/functional.py": "def _create_tensor(*a): ...\ndef cast(*a): ...\ndef where(*a): ...\n",
    "tensorrt_llm/models/__init__.py": """
        from types import SimpleNamespace
        from tensorrt_llm.layers.lora import Lora

        class Attention:
            def __init__(self):
                self.qkv_lora = Lora(64, [32, 16, 16], 64)
        class Linear:
            pass
        class RowLinear(Linear):
            def __init__(self):
                self.lora = Lora(32, [64], 64)
        class GatedMLP:
            def __init__(self):
                self.lora = Lora(64, [128, 128], 64)

        class LLaMAForCausalLM:
            def __init__(self, config):
                self.config = config
                self.parts = {{"layers.0.attention": Attention(), "layers.0.attention.dense": RowLinear(),
                              "layers.0.mlp": GatedMLP(), "layers.0.mlp.proj": RowLinear()}}
            @classmethod
            def from_checkpoint(cls, ckpt_dir, config):
                return cls(config)
            @classmethod
            def from_hugging_face(cls, model_dir, dtype, mapping):
                return cls(SimpleNamespace(mapping=mapping, dtype=dtype))
            def named_modules(self):
                return [("", self), *self.parts.items()]
            def prepare_inputs(self, **kwargs):
                self.prepared_with = kwargs
                self.seen_at_prepare = {{(p, a): type(getattr(m, a)).__name__ for p, m in self.parts.items()
                                        for a in ("qkv_lora", "lora") if hasattr(m, a)}}
                return kwargs
        """,
    "tensorrt/__init__.py": """
        __version__ = {trt_version!r}

        class PluginCreator:
            def create_plugin(self, name, fields, phase):
                return {{"name": name, "fields": {{f.name: list(f.data) for f in fields}}, "phase": phase}}

        class Registry:  # a plugin library registers its creators when it is loaded
            def __init__(self):
                self.creators = {{}}
            def get_creator(self, name, version, namespace):
                return self.creators.get((name, version, namespace))

        REGISTRY = Registry()

        def get_plugin_registry():
            return REGISTRY

        class PluginField:
            def __init__(self, name, data, field_type):
                self.name, self.data, self.field_type = name, data, field_type

        class PluginFieldCollection(list):
            pass

        class PluginFieldType:
            INT32 = "INT32"

        class TensorRTPhase:
            BUILD = "BUILD"
        """,
}


def write_fake_stack(root: Path, trtllm_version: str = TENSORRT_LLM_VERSION, trt_version: str = TENSORRT_VERSION) -> Path:
    files = {name: textwrap.dedent(text).format(trtllm_version=trtllm_version, trt_version=trt_version)
             for name, text in FILES.items()}
    # as pip installs them: tensorrt_llm's own distribution; `tensorrt` provided by a distribution of another name
    for dist, version, package in (("tensorrt_llm", trtllm_version, "tensorrt_llm"), ("tensorrt_cu13", trt_version, "tensorrt")):
        files[f"{dist}-{version}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        files[f"{dist}-{version}.dist-info/top_level.txt"] = f"{package}\n"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def build_in_worker(model_cls: type, tp_size: int, tp_rank: int) -> tuple[str, list[str], str]:
    """What trtllm-build's `build_and_save` does with the model class it receives in a spawned worker process
    (tensorrt_llm/commands/build.py @ 65f1d153: `model_cls.from_checkpoint`, then the builder's `prepare_inputs`)."""
    config = SimpleNamespace(mapping=SimpleNamespace(tp_size=tp_size, tp_rank=tp_rank))
    model = model_cls.from_checkpoint("ckpt", config=config)
    model.prepare_inputs(max_batch_size=4, lora_target_modules=["attn_q", "attn_k", "attn_v"])
    return type(model).__qualname__, sorted(set(model.seen_at_prepare.values())), type(model).__module__

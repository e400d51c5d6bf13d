"""Swap TensorRT-LLM's `Lora` modules for BD-LoRA ones that call our `BdLora` plugin with the same runtime
inputs, so the engine's input names (`{module}_lora_ranks_{layer}`, `{module}_lora_weights_pointers_{layer}`)
and the whole runtime are unchanged. Targets the versions pinned in `trtllm_bdlora.versions`.

The swap hook is a model class (`bdlora_model_class`): TensorRT-LLM's `build()` runs `optimize_model_with_config`
(which calls `add_lora`) and then `model.prepare_inputs(...)` inside `net_guard` before tracing `forward`
(tensorrt_llm/builder.py), so a subclass whose `prepare_inputs` swaps the Lora modules first needs no patching.
The same class serves `trtllm-build --model_cls_file trtllm_bdlora/trtllm/model_cls.py --model_cls_name
BdLoraLLaMAForCausalLM` (commands/build.py loads it with SourceFileLoader and calls `from_checkpoint`). Its
`prepare_inputs` refuses an empty `lora_target_modules` (TensorRT-LLM's default: an engine without LoRA inputs).
The class pickles by reference (`BdLora<name>` of this module, resolved by `__getattr__`), and a process that
has not loaded the plugin library loads it on first use, so `trtllm-build --workers N` can spawn builders.

`plan_replacements` is pure (tested everywhere); `replace_lora_modules`, `BdLoraModule` and
`create_bdlora_plugin` import tensorrt / tensorrt_llm lazily and run only inside the container.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from trtllm_bdlora.adapters.trtllm_format import TRTLLM_NAMES
from trtllm_bdlora.config import CONTAINER_PLUGIN_LIB
from trtllm_bdlora.errors import BdLoraError

PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "BdLora", "1", "trtllm_bdlora"
PLUGIN_LIB_ENV = "TRTLLM_BDLORA_PLUGIN_LIB"  # the plugin library trtllm-build's processes load (default: the container's)
CLASS_PREFIX = "BdLora"  # BdLora<name>: the BD-LoRA class of tensorrt_llm.models.<name>
LORA_TARGET_MODULES = tuple(TRTLLM_NAMES.values())  # TensorRT-LLM's names of the modules adapters carry
BD_A, BD_B = 1, 2  # the plugin's bd_factors: row-parallel -> block-diagonal A, column-parallel -> B
COLUMN_OWNERS = ("Attention", "BertAttention", "ColumnLinear", "Linear", "MLP", "GatedMLP", "FusedGatedMLP")
ROW_OWNERS = ("RowLinear",)


@dataclass(frozen=True)
class Replacement:
    path: str  # dotted path of the module that owns the Lora attribute
    attr: str  # "qkv_lora", "lora", "fused_gate_up_lora"
    bd_factors: tuple[int, ...]  # one per plugin output


def _owner_kind(class_names: list[str]) -> str:
    """Row or column from the owner's class and its bases (RowLinear derives from Linear: check it first)."""
    if any(n in ROW_OWNERS for n in class_names):
        return "row"
    if any(n in COLUMN_OWNERS for n in class_names):
        return "column"
    raise ValueError(f"no BD-LoRA rule for a Lora module owned by {class_names[0]}")


def plan_replacements(owners: list[tuple[str, list[str], str, int]]) -> list[Replacement]:
    """owners: (path, owner class MRO names, Lora attribute, number of Lora outputs) per Lora module.
    Which factor is block-diagonal follows the layer type: column-parallel -> B, row-parallel -> A."""
    plan = []
    for path, class_names, attr, n_out in owners:
        factor = BD_A if _owner_kind(class_names) == "row" else BD_B
        plan.append(Replacement(path, attr, (factor,) * n_out))
    return plan


def load_plugin_library(path: str) -> None:
    """Load our plugin library into this process; it registers BdLora with TensorRT's registry as it loads."""
    lib = Path(path)
    if not lib.is_file():
        raise BdLoraError(
            f"{lib}: plugin library not found (build it: cmake -S plugins -B plugins/build && cmake --build plugins/build)"
        )
    ctypes.CDLL(str(lib.resolve()), mode=ctypes.RTLD_GLOBAL)


def require_lora_target_modules(modules) -> None:
    """TensorRT-LLM creates an engine's LoRA inputs only for the modules its LoraConfig targets, and
    `LoraConfig.lora_target_modules` defaults to none: such an engine refuses every adapter at run time."""
    if not modules:
        raise BdLoraError(f"no LoRA target modules: the engine would have no LoRA inputs and refuse every adapter; "
                          f"build with --lora_target_modules {' '.join(LORA_TARGET_MODULES)}")


def create_bdlora_plugin(in_hidden_size: int, out_hidden_sizes: list[int], bd_factors: tuple[int, ...],
                         dtype, max_low_rank: int, tp_size: int, tp_rank: int):
    import numpy as np
    import tensorrt as trt

    def creator():
        return trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)

    if creator() is None:  # a process of its own (trtllm-build --workers N spawns them): load the library here too
        load_plugin_library(os.environ.get(PLUGIN_LIB_ENV, CONTAINER_PLUGIN_LIB))
    if creator() is None:
        raise RuntimeError("BdLora plugin not registered: load libtrtllm_bdlora_plugin.so first (see plugin_lib)")

    def field(name, values):
        return trt.PluginField(name, np.array(values, dtype=np.int32), trt.PluginFieldType.INT32)

    fields = trt.PluginFieldCollection([
        field("in_hidden_size", [in_hidden_size]),
        field("num_lora_modules", [len(out_hidden_sizes)]),
        field("out_hidden_sizes", out_hidden_sizes),
        field("bd_factors", list(bd_factors)),
        field("type_id", [int(dtype)]),
        field("remove_input_padding", [1]),
        field("max_low_rank", [max_low_rank]),
        field("tp_size", [tp_size]),
        field("tp_rank", [tp_rank]),
    ])
    return creator().create_plugin("bdlora", fields, trt.TensorRTPhase.BUILD)


def make_bdlora_module_class():
    """A subclass of TensorRT-LLM's Lora whose forward adds our plugin instead of theirs."""
    from tensorrt_llm._common import default_net, default_trtnet
    from tensorrt_llm._utils import str_dtype_to_trt
    from tensorrt_llm.functional import _create_tensor, cast, where
    from tensorrt_llm.layers.lora import Lora

    class BdLoraModule(Lora):
        def __init__(self, original: Lora, bd_factors: tuple[int, ...], tp_size: int, tp_rank: int):
            super().__init__(in_hidden_size=original.in_hidden_size, out_hidden_sizes=original.out_hidden_sizes,
                             max_low_rank=original.max_low_rank)
            self.bd_factors, self.tp_size, self.tp_rank = bd_factors, tp_size, tp_rank

        def forward(self, x, lora_runtime_params=None, is_cross_attention: bool = False):
            plugin_config = default_net().plugin_config
            if not plugin_config.lora_plugin:
                raise RuntimeError("BD-LoRA needs the engine built with --lora_plugin")
            if not plugin_config.remove_input_padding:
                raise RuntimeError("BD-LoRA needs remove_input_padding")
            dtype = str_dtype_to_trt(plugin_config.lora_plugin)
            p = lora_runtime_params
            lengths = p.host_encoder_input_lengths if is_cross_attention else p.host_context_lengths
            plugin = create_bdlora_plugin(self.in_hidden_size, list(self.out_hidden_sizes), self.bd_factors, dtype,
                                          self.max_low_rank, self.tp_size, self.tp_rank)
            inputs = [cast(x, dtype).trt_tensor, p.host_request_types.trt_tensor]
            inputs += [t.trt_tensor for t in p.lora_ranks] + [t.trt_tensor for t in p.lora_weights_pointers]
            inputs.append(lengths.trt_tensor)
            layer = default_trtnet().add_plugin_v3(inputs, [], plugin)
            outputs = [cast(_create_tensor(layer.get_output(i), layer), x.dtype) for i in range(layer.num_outputs)]
            mask = getattr(p, "partial_lora_mask", None)
            if mask is not None:
                outputs = [where(mask, o, 0) for o in outputs]
            return outputs if len(outputs) > 1 else outputs[0]

    return BdLoraModule


def replace_lora_modules(model, tp_size: int, tp_rank: int) -> list[Replacement]:
    """In-place: every Lora module of a TensorRT-LLM model becomes a BdLoraModule. Returns what changed."""
    from tensorrt_llm.layers.lora import Lora

    bdlora_cls = make_bdlora_module_class()
    owners, found = [], {}
    for path, module in model.named_modules():
        for attr in ("qkv_lora", "lora", "fused_gate_up_lora", "cross_qkv_lora"):
            lora = getattr(module, attr, None)
            if isinstance(lora, Lora) and not isinstance(lora, bdlora_cls):
                names = [c.__name__ for c in type(module).__mro__]
                owners.append((path, names, attr, len(lora.out_hidden_sizes)))
                found[(path, attr)] = (module, lora)
    plan = plan_replacements(owners)
    for r in plan:
        module, lora = found[(r.path, r.attr)]
        setattr(module, r.attr, bdlora_cls(lora, r.bd_factors, tp_size, tp_rank))
    return plan


@functools.cache
def bdlora_model_class(base_cls: type) -> type:
    """`base_cls` (TensorRT-LLM's LLaMAForCausalLM) whose Lora modules become BD-LoRA modules when the builder
    prepares the network inputs, i.e. after `add_lora` and before `forward` is traced."""

    class BdLoraModel(base_cls):
        def prepare_inputs(self, *args, **kwargs):
            require_lora_target_modules(kwargs.get("lora_target_modules"))  # builder.build passes it by name
            mapping = self.config.mapping
            plan = replace_lora_modules(self, mapping.tp_size, mapping.tp_rank)
            if not plan:
                raise BdLoraError(f"{type(self).__name__}: no Lora modules to make block-diagonal (is the LoRA plugin on?)")
            print(f"rank {mapping.tp_rank}/{mapping.tp_size}: {len(plan)} Lora modules -> BdLora", flush=True)
            return super().prepare_inputs(*args, **kwargs)

    # pickled by reference as trtllm_bdlora.trtllm.network.BdLora<name>, which __getattr__ below resolves
    BdLoraModel.__name__ = BdLoraModel.__qualname__ = f"{CLASS_PREFIX}{base_cls.__name__}"
    BdLoraModel.__module__ = __name__
    return BdLoraModel


def __getattr__(name: str):
    """`BdLora<name>`: the BD-LoRA class of `tensorrt_llm.models.<name>`, made on first use. This is how pickle finds
    the class in a process that has not made it yet: trtllm-build --workers N sends it to spawned processes."""
    if name.startswith(CLASS_PREFIX) and len(name) > len(CLASS_PREFIX):
        import tensorrt_llm.models

        base = getattr(tensorrt_llm.models, name[len(CLASS_PREFIX):], None)
        if isinstance(base, type):
            return bdlora_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_bdlora_model(model):
    """The same model object, now of its BD-LoRA class (which adds behaviour, no state)."""
    model.__class__ = bdlora_model_class(type(model))
    return model

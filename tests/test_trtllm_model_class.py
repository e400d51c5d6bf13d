"""The BD-LoRA model class against TensorRT-LLM's build path (with stand-ins for its packages, tests/trtllm_fakes.py).

Issue 22 defect 8: the documented `trtllm-build` recipe passed no `--lora_target_modules`, so the engine had no
LoRA inputs. The recipe as written in docs/tensorrt-llm.md and in model_cls.py is parsed here by trtllm-build's
own arguments, restated from upstream source below, and taken through what trtllm-build does with them up to
`prepare_inputs`, which now refuses an empty list in one line. `trtllm-bdlora build` builds through
`tensorrt_llm.build` with its own LoraConfig, shown to reach `prepare_inputs` with the modules too.
Defect 10: trtllm-build --workers N pickles the model class into spawned processes; it now pickles by name."""

import argparse
import ast
import json
import pickle
import re
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from importlib.machinery import SourceFileLoader
from multiprocessing import get_context
from types import SimpleNamespace

import pytest

from tests.helpers import REPO
from tests.trtllm_fakes import FAKE_MODULES, build_in_worker, write_fake_stack
from trtllm_bdlora.adapters.trtllm_format import TRTLLM_NAMES
from trtllm_bdlora.config import BuildConfig
from trtllm_bdlora.errors import BdLoraError

# TensorRT-LLM 1.2-era sources, read through the project's index of public repositories (NVIDIA/TensorRT-LLM):
# - tensorrt_llm/commands/build.py @ 65f1d1536e18aea3380e6e270e00895a709333eb: parse_arguments() and build_model()
# - tensorrt_llm/lora_manager.py @ 007e181b5366648aa9b0fda4ec43f508a586bcd8: LoraManager.LORA_MODULE_IDS (the
#   choices of --lora_target_modules)
# - tensorrt_llm/plugin/plugin.py @ c20322ffd3dc0740ca530c9fad989b22e64f6e06: add_plugin_argument() over the
#   pydantic PluginConfig (--lora_plugin: Optional[Literal["auto", "float16", "float32", "bfloat16", "int32", None]],
#   default None shown as "disable"; --remove_input_padding: bool, default True, "enable"/"disable")
# - tensorrt_llm/lora_helper.py @ 037d4ba10931fbb9777d52fba06a9aef4b41acdd: LoraConfig.lora_target_modules
#   defaults to an empty list
# - tensorrt_llm/builder.py @ 008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc: build() calls model.prepare_inputs(...,
#   lora_target_modules=build_config.lora_config.lora_target_modules)
LORA_MODULE_IDS = ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate",
                   "cross_attn_qkv", "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_dense", "moe_h_to_4h",
                   "moe_4h_to_h", "moe_gate", "moe_router", "mlp_router", "mlp_gate_up")
PLUGIN_DTYPES = ("auto", "float16", "float32", "bfloat16", "int32", "disable")

pytestmark = pytest.mark.route


def trtllm_build_parser() -> argparse.ArgumentParser:
    """trtllm-build's arguments that the recipes use, with upstream's names, types, nargs, defaults and choices
    (the sources above); any other flag in a recipe makes parsing fail, so the list must grow from the source."""
    parser = argparse.ArgumentParser(prog="trtllm-build")
    parser.add_argument("--checkpoint_dir", type=str, default=None)
    parser.add_argument("--model_cls_file", type=str, default=None)
    parser.add_argument("--model_cls_name", type=str, default=None)
    parser.add_argument("--output_dir", type=str, default="engine_outputs")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--lora_dir", type=str, default=None, nargs="+")
    parser.add_argument("--lora_ckpt_source", type=str, default="hf", choices=["hf", "nemo"])
    parser.add_argument("--lora_target_modules", nargs="+", default=None, choices=LORA_MODULE_IDS)
    parser.add_argument("--max_lora_rank", type=int, default=64)
    parser.add_argument("--lora_plugin", type=str, default="disable", choices=PLUGIN_DTYPES)
    parser.add_argument("--remove_input_padding", type=str, default="enable", choices=["enable", "disable"])
    return parser


def lora_target_modules_of(args: argparse.Namespace) -> list[str] | None:
    """What build_model puts in build_config.lora_config.lora_target_modules (None: no LoRA config at all, the
    LoRA plugin being off): LoraConfig's default, replaced by --lora_target_modules when given."""
    if args.lora_plugin == "disable":
        return None
    modules: list[str] = []  # LoraConfig(lora_dir=..., lora_ckpt_source=..., max_lora_rank=...).lora_target_modules
    if args.lora_target_modules is not None:
        modules = args.lora_target_modules
    return modules


def recipes(text: str) -> list[list[str]]:
    """Every `trtllm-build` command line in `text` (continuations joined), as the arguments after the program."""
    found = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        tokens = shlex.split(line.split(" # ")[0]) if "trtllm-build " in line and "`" not in line else []
        while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
            tokens.pop(0)  # environment assignments
        if tokens[:1] == ["trtllm-build"]:
            found.append(tokens[1:])
    return found


def documented_recipes() -> dict[str, list[str]]:
    docstring = ast.get_docstring(ast.parse((REPO / "trtllm_bdlora" / "trtllm" / "model_cls.py").read_text()))
    docs = (REPO / "docs" / "tensorrt-llm.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", docs, flags=re.S))
    found = {"model_cls.py": recipes(docstring), "docs/tensorrt-llm.md": recipes(blocks)}
    assert all(len(r) == 1 for r in found.values()), found  # one recipe in each place
    return {place: r[0] for place, r in found.items()}


@pytest.fixture
def fake_stack(tmp_path, monkeypatch):
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(write_fake_stack(tmp_path / "site")))
    yield
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def bdlora_llama(fake_stack):
    from tensorrt_llm.models import LLaMAForCausalLM

    from trtllm_bdlora.trtllm.network import bdlora_model_class

    return bdlora_model_class(LLaMAForCausalLM)


def model(cls, tp_size=2, tp_rank=1):
    return cls.from_checkpoint("ckpt", config=SimpleNamespace(mapping=SimpleNamespace(tp_size=tp_size, tp_rank=tp_rank)))


@pytest.mark.parametrize("place", ["model_cls.py", "docs/tensorrt-llm.md"])
def test_documented_recipe_gives_the_engine_lora_inputs(place, bdlora_llama):
    argv = documented_recipes()[place]
    args = trtllm_build_parser().parse_args(argv)
    modules = lora_target_modules_of(args)
    assert sorted(modules) == sorted(TRTLLM_NAMES.values())  # every module an adapter can carry
    built = model(bdlora_llama)
    built.prepare_inputs(max_batch_size=8, lora_target_modules=modules)  # as tensorrt_llm.build calls it
    assert set(built.seen_at_prepare.values()) == {"BdLoraModule"}
    # the recipe as it was (no --lora_target_modules): the engine would have no LoRA inputs, and is refused
    i = argv.index("--lora_target_modules")
    j = next((k for k in range(i + 1, len(argv)) if argv[k].startswith("--")), len(argv))
    old = lora_target_modules_of(trtllm_build_parser().parse_args(argv[:i] + argv[j:]))
    assert old == []
    with pytest.raises(BdLoraError) as err:
        model(bdlora_llama).prepare_inputs(max_batch_size=8, lora_target_modules=old)
    assert str(err.value) == ("no LoRA target modules: the engine would have no LoRA inputs and refuse every adapter; "
                              "build with --lora_target_modules attn_q attn_k attn_v attn_dense mlp_h_to_4h mlp_4h_to_h "
                              "mlp_gate")


def test_reproduced_parser_refuses_what_upstream_refuses():
    parser = trtllm_build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora_target_modules", "q_proj"])  # Hugging Face names are not choices
    assert parser.parse_args([]).lora_target_modules is None and parser.parse_args([]).lora_plugin == "disable"


def test_trtllm_bdlora_build_passes_the_modules(fake_stack, tiny_llama, tmp_path, monkeypatch):
    import torch

    from trtllm_bdlora.trtllm.build import build_trtllm_rank

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    args = BuildConfig(model=str(tiny_llama), tp=2, output=str(tmp_path), dtype="float16", max_batch_size=4,
                       max_input_len=16, max_lora_rank=16)
    build_trtllm_rank(args, 1)
    saved = json.loads((tmp_path / "rank1.engine").read_text())
    assert saved["prepared_with"]["lora_target_modules"] == list(TRTLLM_NAMES.values())
    assert saved["swapped"] == ["BdLoraModule"]


def test_model_class_pickles_into_spawned_workers(fake_stack, tmp_path, monkeypatch):
    """As trtllm-build --workers 2 does (commands/build.py parallel_build: a spawn ProcessPoolExecutor is handed
    the class loaded from --model_cls_file)."""
    import subprocess

    lib = tmp_path / "libempty.so"  # stands in for the plugin library that model_cls.py loads
    (tmp_path / "empty.c").write_text("int bdlora_placeholder;\n")
    subprocess.run(["gcc", "-shared", "-fPIC", str(tmp_path / "empty.c"), "-o", str(lib)], check=True)
    monkeypatch.setenv("TRTLLM_BDLORA_PLUGIN_LIB", str(lib))
    module = SourceFileLoader("models", str(REPO / "trtllm_bdlora" / "trtllm" / "model_cls.py")).load_module()
    cls = module.BdLoraLLaMAForCausalLM
    assert pickle.loads(pickle.dumps(cls)) is cls
    with ProcessPoolExecutor(mp_context=get_context("spawn"), max_workers=2) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(build_in_worker, cls, 2, rank) for rank in (0, 1)]]
    assert results == [("BdLoraLLaMAForCausalLM", ["BdLoraModule"], "trtllm_bdlora.trtllm.network")] * 2


def test_a_spawned_worker_loads_the_plugin_library(fake_stack, monkeypatch):
    """A worker process has not run model_cls.py: the first BdLora plugin it creates loads the library named by
    TRTLLM_BDLORA_PLUGIN_LIB (inherited from trtllm-build's environment)."""
    import tensorrt as trt

    from trtllm_bdlora.trtllm import network

    loaded = []

    def load(path):  # the library's static registrar, as loading it runs
        loaded.append(path)
        trt.REGISTRY.creators[(network.PLUGIN_NAME, network.PLUGIN_VERSION, network.PLUGIN_NAMESPACE)] = trt.PluginCreator()

    monkeypatch.setattr(network, "load_plugin_library", lambda path: None)
    monkeypatch.setenv("TRTLLM_BDLORA_PLUGIN_LIB", "/opt/x/libtrtllm_bdlora_plugin.so")
    with pytest.raises(RuntimeError, match="BdLora plugin not registered"):
        network.create_bdlora_plugin(64, [32], (network.BD_B,), 1, 16, 2, 1)
    monkeypatch.setattr(network, "load_plugin_library", load)
    for _ in range(2):
        plugin = network.create_bdlora_plugin(64, [32, 16, 16], (network.BD_B,) * 3, 1, 16, 2, 1)
    assert loaded == ["/opt/x/libtrtllm_bdlora_plugin.so"]  # once: then the creator is registered
    assert plugin["fields"]["bd_factors"] == [network.BD_B] * 3 and plugin["fields"]["tp_rank"] == [1]


def test_unknown_names_are_not_classes(fake_stack):
    from trtllm_bdlora.trtllm import network

    with pytest.raises(AttributeError):
        network.BdLoraNoSuchModel  # noqa: B018
    with pytest.raises(AttributeError):
        network.SomethingElse  # noqa: B018

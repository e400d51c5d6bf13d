"""Issue 22 defect 9: `lora_prefetch_dir`, a parameter of the 1.2 `tensorrt_llm` config, is written by
fill-model-repo (empty unless set), and a local prefetch directory is checked: prefetched adapters skip
`preprocessing`, so each must already be in the BD-LoRA engine's form, dtype and rank limit."""

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.trtllm_format import convert_adapter, write_converted
from trtllm_bdlora.config import FillRepoConfig
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.llama.loader import load_model_config
from trtllm_bdlora.trtllm.triton_repo import fill_main, fill_model_repo

# the LoRA parameters of upstream's tensorrt_llm config (TensorRT-LLM triton_backend/all_models/inflight_batcher_llm/
# tensorrt_llm/config.pbtxt @ 0c8de69a1ca6213eebb20a51873890ff128666c2, version 1.2.0rc8; tests/data/README.md),
# each `string_value: "${<same name>}"`
UPSTREAM_LORA_PARAMETERS = ("lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size",
                            "lora_cache_gpu_memory_fraction", "lora_cache_host_memory_bytes", "lora_prefetch_dir")
TP = 2

pytestmark = [pytest.mark.unit, pytest.mark.route]


def parameters(repo) -> dict[str, str]:
    config = text_format.Parse((repo / "tensorrt_llm" / "config.pbtxt").read_text(), mc.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.fixture
def engine(tiny_llama, tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "bdlora_build.json").write_text(json.dumps({
        "tp": TP, "dtype": "float16", "max_lora_rank": 64, "shape": load_model_config(str(tiny_llama)).__dict__}))
    return engines


def fill(tmp_path, engine_dir, prefetch=None):
    params = {"engine_dir": str(engine_dir), "tokenizer_dir": "/t"}
    if prefetch is not None:
        params["lora_prefetch_dir"] = str(prefetch)
    return fill_model_repo(tmp_path / "repo", params)


def test_written_like_upstream(engine, tmp_path):
    written = parameters(fill(tmp_path, engine))
    assert set(UPSTREAM_LORA_PARAMETERS) <= set(written)
    assert written["lora_prefetch_dir"] == ""  # none unless asked for: the backend skips a missing directory


def test_converted_adapters_pass_and_the_path_is_written(engine, bd_adapters, lora_adapter, tmp_path):
    prefetch = tmp_path / "prefetch"
    write_converted(*convert_adapter(load_peft_adapter(bd_adapters[0]), TP, "float16", 64), prefetch / "1")
    write_converted(*convert_adapter(load_peft_adapter(lora_adapter), TP, "float16", 64), prefetch / "2")
    (prefetch / "README").write_text("files beside the task directories are ignored, as upstream does\n")
    assert parameters(fill(tmp_path, engine, prefetch))["lora_prefetch_dir"] == str(prefetch)


@pytest.mark.parametrize("case", ["plain_form", "dtype", "non_digit", "missing_file"])
def test_bad_prefetch_entries_are_refused(case, engine, lora_adapter, tmp_path):
    prefetch = tmp_path / "prefetch"
    plain = load_peft_adapter(lora_adapter)  # rank 12, not block-diagonal
    if case == "plain_form":  # TensorRT-LLM's plain form: TP 2 would compute 6 of its 12 ranks per rank, summed wrong
        write_converted(*convert_adapter(plain, 1, "float16", 64), prefetch / "7")
        message = (rf"^{prefetch / '7'}: layer 0 \w+: rank 12 in the plain-LoRA form, of which the BD-LoRA engine at tp 2 "
                   r"would compute 1/2 on each rank; write it with `trtllm-bdlora convert-adapter")
    elif case == "dtype":
        write_converted(*convert_adapter(plain, TP, "float32", 64), prefetch / "7")
        message = rf"^{prefetch / '7'}: weights are float32, the engine's dtype is float16"
    elif case == "non_digit":
        write_converted(*convert_adapter(plain, TP, "float16", 64), prefetch / "my-adapter")
        message = rf"^{prefetch / 'my-adapter'}: not a task id"
    else:
        write_converted(*convert_adapter(plain, TP, "float16", 64), prefetch / "7")
        (prefetch / "7" / "model.lora_config.npy").unlink()
        message = rf"^{prefetch / '7'}: missing model.lora_config.npy$"
    with pytest.raises(BdLoraError, match=message) as err:
        fill(tmp_path, engine, prefetch)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "repo").exists()


def test_without_the_engine_only_the_layout_is_checked(lora_adapter, tmp_path):
    """Engines that live elsewhere (only inside the container): the adapters cannot be checked, the layout can."""
    prefetch = tmp_path / "prefetch"
    write_converted(*convert_adapter(load_peft_adapter(lora_adapter), 1, "float16", 64), prefetch / "7")
    params = {"engine_dir": "/engines/elsewhere", "tokenizer_dir": "/t", "tp_size": "2", "lora_prefetch_dir": str(prefetch)}
    assert parameters(fill_model_repo(tmp_path / "repo", params))["lora_prefetch_dir"] == str(prefetch)
    (prefetch / "x").mkdir()
    with pytest.raises(BdLoraError, match="not a task id"):
        fill_model_repo(tmp_path / "repo2", params)


def test_cli_notes_a_directory_it_cannot_see(engine, tmp_path, capsys):
    args = FillRepoConfig(engine_dir=str(engine), tokenizer_dir="/t", output=str(tmp_path / "repo"),
                          settings=("lora_prefetch_dir=/adapters/prefetch",))
    assert fill_main(args) == 0
    out = capsys.readouterr().out
    assert "note: lora_prefetch_dir /adapters/prefetch is not a directory here, so its adapters were not checked" in out
    assert parameters(tmp_path / "repo")["lora_prefetch_dir"] == "/adapters/prefetch"

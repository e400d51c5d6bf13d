"""The interface description against upstream's configs (tests/data/upstream_inflight_batcher_llm.json): every
input and output upstream declares exists with the same data type and dims in what fill-model-repo writes;
the `lora_weights` data type placeholder; the ensemble's wiring."""

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tests.helpers import REPO
from trtllm_bdlora.errors import BdLoraError
from trtllm_bdlora.serving.repository.spec import DEFAULTS, ENSEMBLE, MODELS
from trtllm_bdlora.trtllm.triton_repo import fill_model_repo

UPSTREAM = json.loads((REPO / "tests" / "data" / "upstream_inflight_batcher_llm.json").read_text())["models"]
PARAMS = {"engine_dir": "/engines/x", "tokenizer_dir": "/models/y", "tp_size": "2"}


def _configs(root, **params):
    repo = fill_model_repo(root, {**PARAMS, **params})
    return {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in repo.rglob("config.pbtxt")}


def _resolve(dtype: str, values: dict) -> str:
    return values[dtype[2:-1]] if dtype.startswith("${") else dtype


def test_written_configs_declare_every_upstream_tensor(tmp_path):
    configs = _configs(tmp_path)
    assert set(configs) == set(UPSTREAM)
    for model, facts in UPSTREAM.items():
        inputs = {i.name: (mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in configs[model].input}
        for name, dtype, dims, optional in facts["inputs"]:
            assert inputs.get(name) == (_resolve(dtype, DEFAULTS), dims, optional), (model, name)
        outputs = {o.name: (mc.DataType.Name(o.data_type), list(o.dims)) for o in configs[model].output}
        for name, dtype, dims in facts["outputs"]:
            assert outputs.get(name) == (_resolve(dtype, DEFAULTS), dims), (model, name)
    # only our additions beyond upstream: the LoRA route through preprocessing
    extra = {m: {i.name for i in c.input} - {f[0] for f in UPSTREAM[m]["inputs"]} for m, c in configs.items()}
    assert extra == {"preprocessing": {"LORA_WEIGHTS", "LORA_CONFIG"}, "tensorrt_llm": set(), "postprocessing": set(),
                     "ensemble": set(), "tensorrt_llm_bls": set()}


@pytest.mark.parametrize("dtype", ["TYPE_FP16", "TYPE_BF16", "TYPE_FP32"])
def test_lora_weights_dtype_placeholder(tmp_path, dtype):
    configs = _configs(tmp_path, **({} if dtype == "TYPE_FP16" else {"lora_weights_data_type": dtype}))
    seen = []
    for model, config in configs.items():
        for t in [*config.input, *config.output]:
            if t.name.lower() in ("lora_weights", "out_lora_weights"):
                seen.append((model, t.name, mc.DataType.Name(t.data_type)))
    assert len(seen) == 5 and {s[2] for s in seen} == {dtype}, seen  # ensemble, bls, preprocessing in+out, core


def test_lora_weights_dtype_comes_from_the_engine_and_is_checked(tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "bdlora_build.json").write_text(json.dumps({"tp": 4, "dtype": "bfloat16", "max_lora_rank": 32}))
    repo = fill_model_repo(tmp_path / "r", {"engine_dir": str(engines), "tokenizer_dir": "/t"})
    core = text_format.Parse((repo / "tensorrt_llm" / "config.pbtxt").read_text(), mc.ModelConfig())
    pre = text_format.Parse((repo / "preprocessing" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert mc.DataType.Name(next(i for i in core.input if i.name == "lora_weights").data_type) == "TYPE_BF16"
    assert pre.parameters["tp_size"].string_value == "4"
    assert core.parameters["lora_cache_max_adapter_size"].string_value == "32"
    with pytest.raises(BdLoraError, match="lora_weights_data_type must be one of"):
        fill_model_repo(tmp_path / "bad", {**PARAMS, "lora_weights_data_type": "TYPE_INT32"})
    with pytest.raises(BdLoraError, match="--tp is required"):
        fill_model_repo(tmp_path / "no_tp", {"engine_dir": "/nowhere", "tokenizer_dir": "/t"})


def test_ensemble_wiring_routes_lora_through_preprocessing():
    pre, core, _ = ENSEMBLE.steps
    assert pre.inputs["LORA_WEIGHTS"] == "lora_weights" and pre.inputs["LORA_CONFIG"] == "lora_config"
    assert core.inputs["lora_weights"] == pre.outputs["OUT_LORA_WEIGHTS"]
    assert core.inputs["lora_config"] == pre.outputs["OUT_LORA_CONFIG"]
    assert core.inputs["lora_task_id"] == "lora_task_id"
    # every external input reaches a step, every step input exists, every ensemble output is produced
    produced = {t.name for t in ENSEMBLE.inputs}
    consumed = set()
    for step in ENSEMBLE.steps:
        model = MODELS[step.model]
        assert all(model.input(name) is not None for name in step.inputs), step.model
        assert all(model.output(name) is not None for name in step.outputs), step.model
        assert set(step.inputs.values()) <= produced, step.model
        consumed |= set(step.inputs.values())
        produced |= set(step.outputs.values())
    assert {t.name for t in ENSEMBLE.inputs} <= consumed
    assert {t.name for t in ENSEMBLE.outputs} <= produced

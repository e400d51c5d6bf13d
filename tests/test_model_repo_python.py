"""The production repository's Python models (model_repo/*/1/model.py) run here against a stand-in for Triton's
`triton_python_backend_utils`, and the preprocessing LoRA rule (issue 11 item 4): a plain LoRA in TensorRT-LLM's
format would get 1/TP of its rank on each rank of a BD-LoRA engine; preprocessing converts it so that the
BD plugin's per-rank math (an independent float64 model here) sums to PEFT's delta."""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from tests.helpers import REPO, make_peft_adapter
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.trtllm_format import MODULE_NAMES, convert_adapter, normalize_request_adapter
from trtllm_bdlora.llama.loader import load_model_config
from trtllm_bdlora.llama.shape import module_role

TP = 2


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class Response:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class Request:
    def __init__(self, **inputs):
        self._inputs = [Tensor(k, v) for k, v in inputs.items()]

    def inputs(self):
        return self._inputs

    def request_id(self):
        return "r1"


class TritonError(str):
    """pb_utils.TritonError of the 2.51 stub: a message and a code (INTERNAL unless given)."""

    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __new__(cls, message, code=1):
        error = super().__new__(cls, message)
        error.code = code
        return error


def load_model(name: str, parameters: dict, outputs=()):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.TritonError = Tensor, Response, TritonError
    sys.modules["triton_python_backend_utils"] = fake
    sys.modules.pop(f"trtllm_bdlora.trtllm.python_models.{name}", None)  # model.py imports it: bind it to this stand-in
    spec = importlib.util.spec_from_file_location(f"repo_{name}", REPO / "model_repo" / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()},
              "output": [{"name": n, "data_type": "TYPE_FP16"} for n in outputs]}
    model.initialize({"model_config": json.dumps(config)})
    return model


@pytest.fixture(scope="module")
def setup(tiny_llama_with_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo_py")
    model_dir = tiny_llama_with_tokenizer
    shape = load_model_config(str(model_dir))
    engines = root / "engines"
    engines.mkdir()
    (engines / "bdlora_build.json").write_text(json.dumps({"tp": TP, "dtype": "float16", "max_lora_rank": 64,
                                                          "shape": shape.__dict__}))
    (engines / "config.json").write_bytes((model_dir / "config.json").read_bytes())  # max_position_embeddings 256
    plain = load_peft_adapter(make_peft_adapter(model_dir, root / "plain", seed=3, r=8, nblocks=None))
    bd = load_peft_adapter(make_peft_adapter(model_dir, root / "bd", seed=4, r=16))
    pre = load_model("preprocessing", {"tokenizer_dir": str(model_dir), "add_special_tokens": "true",
                                       "gpt_model_path": str(engines), "tp_size": str(TP)})
    return model_dir, shape, plain, bd, pre


def _rows(weights, config, shape):
    for row, (module_id, layer, r) in zip(weights.reshape(-1, weights.shape[-1]), config.reshape(-1, 3).tolist()):
        name = MODULE_NAMES[module_id]
        d_in, d_out = shape.module_dims(name)
        a = torch.from_numpy(row[: r * d_in].astype(np.float64)).view(r, d_in)
        b = torch.from_numpy(row[r * d_in : r * (d_in + d_out)].astype(np.float64)).view(d_out, r)
        yield (layer, name), a, b


def bd_plugin_delta(a, b, role, x):
    """The BD-LoRA plugin on TP ranks after the runtime split: rank i multiplies its block rows of A and the
    same columns of B (column modules: its out-slice of B; row modules: its in-slice of x and A), summed."""
    k, parts = a.shape[0] // TP, []
    for i in range(TP):
        cols = slice(i * k, (i + 1) * k)
        if role == "column":
            out = b.shape[0] // TP
            parts.append(x @ a[cols].T @ b[i * out : (i + 1) * out, cols].T)
        else:
            inp = x.shape[1] // TP
            sl = slice(i * inp, (i + 1) * inp)
            parts.append(x[:, sl] @ a[cols, sl].T @ b[:, cols].T)
    return torch.cat(parts, dim=1) if role == "column" else sum(parts)


def test_preprocessing_converts_a_plain_lora_for_the_bd_engine(setup):
    model_dir, shape, plain, _, pre = setup
    weights, config = convert_adapter(plain, tp=1, dtype="float16")  # the plain form hf_lora_convert.py writes
    response = pre.execute([Request(QUERY=np.array([[b"Hello there"]], dtype=object),
                                    REQUEST_OUTPUT_LEN=np.array([[4]], np.int32), LORA_WEIGHTS=weights,
                                    LORA_CONFIG=config)])[0]
    assert response.error is None, response.error
    out_w, out_c = response.outputs["OUT_LORA_WEIGHTS"], response.outputs["OUT_LORA_CONFIG"]
    assert out_w.dtype == np.float16 and (out_c[..., 2] == 2 * config[..., 2]).all()  # rank TP*r
    from transformers import AutoTokenizer

    assert response.outputs["INPUT_ID"][0].tolist() == AutoTokenizer.from_pretrained(model_dir).encode("Hello there")
    x = torch.randn(5, max(shape.hidden_size, shape.num_heads * shape.head_dim, shape.intermediate_size),
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sent = {key: (a, b) for key, a, b in _rows(weights, config, shape)}
    assert len(sent) == len(plain.modules)
    for key, a, b in _rows(out_w, out_c, shape):
        sent_a, sent_b = sent[key]
        xin = x[:, : a.shape[1]]
        meant = xin @ sent_a.T @ sent_b.T  # the delta the client's plain adapter stands for
        f = plain.modules[key]  # ... which is PEFT's, up to the fp16 of the request format
        torch.testing.assert_close(meant, xin @ f.dense_a().double().T @ (f.dense_b().double() * f.scaling).T,
                                   rtol=0.05, atol=2e-2)
        role = module_role(key[1])
        torch.testing.assert_close(bd_plugin_delta(a, b, role, xin), meant, rtol=1e-9, atol=1e-9)
        wrong = bd_plugin_delta(sent_a, sent_b, role, xin)  # what the engine computes without the conversion
        assert (wrong - meant).abs().max() > 0.1 * meant.abs().max(), key


def test_preprocessing_passes_bd_forms_and_refuses_bad_ones(setup):
    _, shape, _, bd, pre = setup
    weights, config = convert_adapter(bd, tp=TP, dtype="float16")  # what `convert-adapter --tp 2` writes
    out = pre.execute([Request(QUERY=np.array([[b"Hi"]], dtype=object), REQUEST_OUTPUT_LEN=np.array([[4]], np.int32),
                               LORA_WEIGHTS=weights, LORA_CONFIG=config)])[0]
    assert out.error is None and np.array_equal(out.outputs["OUT_LORA_WEIGHTS"], weights)
    bad = weights.copy()
    bad[0, 0, 0] = np.nan
    good, broken = pre.execute([Request(QUERY=np.array([[b"Hi"]], dtype=object), REQUEST_OUTPUT_LEN=np.array([[4]], np.int32)),
                                Request(QUERY=np.array([[b"Hi"]], dtype=object), REQUEST_OUTPUT_LEN=np.array([[4]], np.int32),
                                        LORA_WEIGHTS=bad, LORA_CONFIG=config)])
    assert good.error is None and "OUT_LORA_WEIGHTS" not in good.outputs
    assert "NaN" in broken.error and "\n" not in broken.error
    assert broken.error.code == TritonError.INVALID_ARG  # a bad request, not a server fault (issue 22 defect 2)
    w, c = normalize_request_adapter(*convert_adapter(bd, tp=1), shape, 1, 64)  # TP 1: nothing to convert
    assert np.array_equal(w, convert_adapter(bd, tp=1)[0]) and np.array_equal(c, convert_adapter(bd, tp=1)[1])
    over = pre.execute([Request(QUERY=np.array([[b"Hi"]], dtype=object), REQUEST_OUTPUT_LEN=np.array([[4]], np.int32),
                                LORA_WEIGHTS=weights, LORA_CONFIG=np.where(config == 16, 80, config).astype(np.int32))])[0]
    assert over.error is not None and "\n" not in over.error


def test_postprocessing_decodes_up_to_sequence_length(setup):
    model_dir = setup[0]
    post = load_model("postprocessing", {"tokenizer_dir": str(model_dir), "skip_special_tokens": "true"})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode("The capital of France is")
    tokens = np.array([[ids + [0, 0]]], np.int32)
    out = post.execute([Request(TOKENS_BATCH=tokens, SEQUENCE_LENGTH=np.array([[len(ids)]], np.int32))])[0]
    assert out.outputs["OUTPUT"].tolist() == [b"The capital of France is"]


def test_preprocessing_refuses_text_too_long_for_the_engine_before_tokenizing(setup):
    """Issue 22 defect 6: the production preprocessing has serve's text-size guard, from the engine's max_seq_len."""
    _, _, _, _, pre = setup
    from transformers import AutoTokenizer

    from trtllm_bdlora.engine.request import max_text_bytes

    limit = max_text_bytes(AutoTokenizer.from_pretrained(setup[0]), 256)
    fits, too_long = (Request(QUERY=np.array([[b"a" * n]], dtype=object), REQUEST_OUTPUT_LEN=np.array([[4]], np.int32))
                      for n in (limit, limit + 1))
    ok, refused = pre.execute([fits, too_long])
    assert ok.error is None and ok.outputs["REQUEST_INPUT_LEN"][0, 0] > 0
    assert refused.error.code == TritonError.INVALID_ARG
    assert refused.error == f"QUERY of {limit + 1} bytes cannot fit the context of 256 tokens (at most {limit} bytes " \
                            "of text); refused before tokenizing"


def test_embedded_workers_agree_with_rank_0_on_what_they_run():
    """The Python tensorrt_llm's TP ranks 1..N-1 are `serve` workers, which first check that every rank runs the same
    layout (distributed/hosts.py): the workers' command line parses to rank 0's engine configuration, rank watch
    (--rank-timeout) included."""
    from trtllm_bdlora.cli import build_parser
    from trtllm_bdlora.trtllm.triton_core import engine_config, worker_argv

    for params in ({}, {"lora_cache_max_adapter_size": "16", "lora_cache_host_memory_bytes": "70000"},
                   {"lora_cache_max_adapter_size": "${lora_cache_max_adapter_size}"}):
        config = engine_config("/engines/e2", 3, params)
        ns = build_parser().parse_args(worker_argv(config))
        assert ns.command == "serve" and config.tp == 3
        assert ns.configure(ns).engine == config
        assert config.max_lora_rank == (16 if params.get("lora_cache_max_adapter_size") == "16" else None)
        assert config.lora_cache_host_bytes == (70000 if "lora_cache_host_memory_bytes" in params else 1 << 30)


def test_a_tensorrt_llm_that_is_not_decoupled_refuses_batches_and_streaming():
    """As the TensorRT-LLM backend (utils.cc createRequestsFromInputTensors) with decoupled_mode=false: a batch of
    requests and `streaming` need the decoupled policy; one request without streaming passes. (NVIDIA's
    inflight_batcher_llm_client.py --streaming against such a repository got the whole sequence, prompt included.)"""
    from trtllm_bdlora.errors import InputError
    from trtllm_bdlora.serving.repository.core import check_not_decoupled

    one = {"input_ids": np.array([[5, 6, 7]], np.int32), "input_lengths": np.array([[3]], np.int32),
           "request_output_len": np.array([[4]], np.int32)}
    check_not_decoupled(one)
    check_not_decoupled({**one, "streaming": np.array([[False]])})
    with pytest.raises(InputError, match=r"^streaming is only supported .* decoupled mode") as info:
        check_not_decoupled({**one, "streaming": np.array([[True]])})
    assert info.value.status.grpc == "INVALID_ARGUMENT"
    two = {"input_ids": np.array([[5, 6, 7], [8, 9, 10]], np.int32), "input_lengths": np.array([[3], [3]], np.int32),
           "request_output_len": np.array([[4], [4]], np.int32)}
    with pytest.raises(InputError, match=r"^input_ids has a batch of 2 requests: batch size > 1 requires"):
        check_not_decoupled(two)

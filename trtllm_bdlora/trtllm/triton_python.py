"""Glue for the production repository's Python models (model_repo/*/1/model.py), which run inside Triton's
Python backend: its tensors to and from numpy (BF16 through DLPack, as numpy has no bfloat16), model
parameters, and a dispatch that runs a step of the chain as a BLS request. `pb_utils` is passed in: this
module imports nothing that exists only inside Triton."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from trtllm_bdlora.errors import RequestError
from trtllm_bdlora.serving.repository.calls import CallContext, ModelResponse
from trtllm_bdlora.serving.repository.spec import MODELS


def parameters(args: dict) -> tuple[dict, dict[str, str]]:
    """(model config, its string parameters) from `initialize`'s args."""
    config = json.loads(args["model_config"])
    return config, {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def to_numpy(tensor) -> np.ndarray:
    try:
        return tensor.as_numpy()
    except Exception:  # BF16 (and device tensors): through torch
        from torch.utils.dlpack import from_dlpack

        return from_dlpack(tensor.to_dlpack()).float().cpu().numpy()


def inputs_of(request) -> dict[str, np.ndarray]:
    return {t.name(): to_numpy(t) for t in request.inputs()}


def tensors(pb_utils, outputs: dict[str, np.ndarray], bf16: frozenset[str] = frozenset()) -> list:
    """Triton tensors; names in `bf16` go as BF16 (from floats, or from bf16 bits stored as `V2`)."""
    out = []
    for name, array in outputs.items():
        if name in bf16:
            import torch
            from torch.utils.dlpack import to_dlpack

            from trtllm_bdlora.adapters.trtllm_format import BF16_STORAGE, weights_as_torch

            values = weights_as_torch(array) if array.dtype == BF16_STORAGE else \
                torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16)
            out.append(pb_utils.Tensor.from_dlpack(name, to_dlpack(values.contiguous())))
        else:
            out.append(pb_utils.Tensor(name, np.ascontiguousarray(array)))
    return out


def bf16_outputs(config: dict) -> frozenset[str]:
    return frozenset(o["name"] for o in config.get("output", []) if o.get("data_type") == "TYPE_BF16")


def error_response(pb_utils, err: Exception):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err)))


def triton_dispatch(pb_utils, bf16: frozenset[str] = frozenset()):
    """A Dispatch (see ensemble.py) that runs each step as a BLS request to the model of that name."""

    def outputs_of(response) -> dict[str, np.ndarray]:
        if response.has_error():
            raise RequestError(response.error().message())
        return {t.name(): to_numpy(t) for t in response.output_tensors()}

    def dispatch(name: str, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        spec = MODELS[name]
        request = pb_utils.InferenceRequest(model_name=name, inputs=tensors(pb_utils, inputs, bf16),
                                            requested_output_names=[t.name for t in spec.outputs],
                                            request_id=ctx.request_id)
        if not spec.decoupled:
            yield ModelResponse(outputs_of(request.exec()))
            return
        for response in request.exec(decoupled=True):
            if ctx.is_cancelled():
                stop = pb_utils.InferenceRequest(model_name=name, requested_output_names=[], request_id=ctx.request_id,
                                                 inputs=tensors(pb_utils, {
                                                     "input_ids": np.zeros((1, 1), np.int32),
                                                     "input_lengths": np.zeros((1, 1), np.int32),
                                                     "request_output_len": np.zeros((1, 1), np.int32),
                                                     "stop": np.ones((1, 1), bool)}))
                list(stop.exec(decoupled=True))
                return
            outputs = outputs_of(response)
            if outputs:
                yield ModelResponse(outputs, final=False)

    return dispatch

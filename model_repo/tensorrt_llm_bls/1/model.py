"""Triton Python backend model `tensorrt_llm_bls`, written by `trtllm-bdlora fill-model-repo`: the code is
trtllm_bdlora.trtllm.python_models.tensorrt_llm_bls in the installed package."""

from trtllm_bdlora.trtllm.python_models.tensorrt_llm_bls import TritonPythonModel  # noqa: F401

"""Triton Python backend model `tensorrt_llm`, written by `trtllm-bdlora fill-model-repo`: the code is
trtllm_bdlora.trtllm.python_models.tensorrt_llm in the installed package."""

from trtllm_bdlora.trtllm.python_models.tensorrt_llm import TritonPythonModel  # noqa: F401

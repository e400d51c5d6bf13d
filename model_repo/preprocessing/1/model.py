"""Triton Python backend model `preprocessing`, written by `trtllm-bdlora fill-model-repo`: the code is
trtllm_bdlora.trtllm.python_models.preprocessing in the installed package."""

from trtllm_bdlora.trtllm.python_models.preprocessing import TritonPythonModel  # noqa: F401

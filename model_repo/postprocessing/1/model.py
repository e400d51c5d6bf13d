"""Triton Python backend model `postprocessing`, written by `trtllm-bdlora fill-model-repo`: the code is
trtllm_bdlora.trtllm.python_models.postprocessing in the installed package."""

from trtllm_bdlora.trtllm.python_models.postprocessing import TritonPythonModel  # noqa: F401

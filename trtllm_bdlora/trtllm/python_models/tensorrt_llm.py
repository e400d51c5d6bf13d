"""Triton Python backend, `tensorrt_llm` for a `trtllm-bdlora build --backend torch` engine directory: the C++
backend's inputs, outputs and semantics over the torch engine, its TP ranks started by this model. The logic lives in
trtllm_bdlora.trtllm.triton_core.TritonCoreModel (over serving.repository.core, which `serve` runs too);
`fill-model-repo` writes this model only for torch builds (TensorRT engines get the tensorrtllm backend)."""

import triton_python_backend_utils as pb_utils

from trtllm_bdlora.trtllm.triton_core import TritonCoreModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = TritonCoreModel(pb_utils, args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()

"""Triton Python backend, `tensorrt_llm_bls`: the preprocessing -> tensorrt_llm -> postprocessing chain run as
BLS requests, with upstream's text stop words and `accumulate_tokens`. The logic lives in
trtllm_bdlora.serving.repository.ensemble (Ensemble, Bls), which `trtllm-bdlora serve` runs too."""

import triton_python_backend_utils as pb_utils

from trtllm_bdlora.serving.repository.ensemble import Bls, Ensemble
from trtllm_bdlora.serving.repository.tokens import flag
from trtllm_bdlora.trtllm.triton_python import TritonCalls, bf16_outputs, parameters, triton_dispatch


class TritonPythonModel:
    def initialize(self, args):
        config, params = parameters(args)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        bf16_lora = any(i["name"] == "lora_weights" and i["data_type"] == "TYPE_BF16" for i in config["input"])
        steps_bf16 = frozenset({"LORA_WEIGHTS", "lora_weights"}) if bf16_lora else frozenset()
        self.model = Bls(Ensemble(triton_dispatch(pb_utils, steps_bf16)), flag(params.get("accumulate_tokens"), False))
        self.bf16 = bf16_outputs(config)
        self.calls = TritonCalls(pb_utils, self.decoupled, self.run)  # each request on its own thread, cancellable

    def run(self, call):
        for response in self.model.infer(call.inputs, call.ctx):
            if response.outputs or response.final:
                call.send(response.outputs or None, response.final, self.bf16)

    def execute(self, requests):
        return self.calls.execute(requests)

    def finalize(self):
        self.calls.stop()

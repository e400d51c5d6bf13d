"""Triton Python backend, `tensorrt_llm_bls`: the preprocessing -> tensorrt_llm -> postprocessing chain run as
BLS requests, with upstream's text stop words and `accumulate_tokens`. The logic lives in
trtllm_bdlora.serving.repository.ensemble (Ensemble, Bls), which `trtllm-bdlora serve` runs too."""

import triton_python_backend_utils as pb_utils

from trtllm_bdlora.serving.repository.calls import CallContext
from trtllm_bdlora.serving.repository.ensemble import Bls, Ensemble
from trtllm_bdlora.serving.repository.tokens import flag
from trtllm_bdlora.trtllm.triton_python import bf16_outputs, error_response, inputs_of, parameters, tensors, triton_dispatch


class TritonPythonModel:
    def initialize(self, args):
        config, params = parameters(args)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        bf16_lora = any(i["name"] == "lora_weights" and i["data_type"] == "TYPE_BF16" for i in config["input"])
        steps_bf16 = frozenset({"LORA_WEIGHTS", "lora_weights"}) if bf16_lora else frozenset()
        self.model = Bls(Ensemble(triton_dispatch(pb_utils, steps_bf16)), flag(params.get("accumulate_tokens"), False))
        self.bf16 = bf16_outputs(config)

    def execute(self, requests):
        responses = []
        for request in requests:
            sender = request.get_response_sender() if self.decoupled else None
            ctx = CallContext(request.request_id(), decoupled=self.decoupled)
            try:
                for response in self.model.infer(inputs_of(request), ctx):
                    if not response.outputs:
                        continue
                    out = pb_utils.InferenceResponse(output_tensors=tensors(pb_utils, response.outputs, self.bf16))
                    if sender is not None:
                        sender.send(out)
                    else:
                        responses.append(out)
            except Exception as err:  # this request gets its error; the model keeps serving
                if sender is not None:
                    sender.send(error_response(pb_utils, err))
                else:
                    responses.append(error_response(pb_utils, err))
            if sender is not None:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None if self.decoupled else responses

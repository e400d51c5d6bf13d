"""Triton Python backend, `postprocessing`: output ids -> text with upstream's semantics. The logic lives in
trtllm_bdlora.serving.repository.text_models.Postprocessing, which `trtllm-bdlora serve` runs too."""

import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from trtllm_bdlora.serving.repository.calls import CallContext
from trtllm_bdlora.serving.repository.text_models import Postprocessing
from trtllm_bdlora.serving.repository.tokens import flag
from trtllm_bdlora.trtllm.triton_python import error_response, inputs_of, parameters, tensors


class TritonPythonModel:
    def initialize(self, args):
        _, params = parameters(args)
        tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"], legacy=False, padding_side="left",
                                                  trust_remote_code=True)
        self.model = Postprocessing(tokenizer, flag(params.get("skip_special_tokens"), True))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = next(iter(self.model.infer(inputs_of(request), CallContext()))).outputs
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors(pb_utils, outputs)))
            except Exception as err:  # one bad request gets its error; the others are answered
                responses.append(error_response(pb_utils, err))
        return responses

"""Triton Python backend, `preprocessing`: text -> token tensors with upstream's semantics, and the request's
LoRA adapter put in the form the BD-LoRA engine computes exactly (a plain LoRA converted, bad ones refused:
trtllm_bdlora.adapters.trtllm_format.normalize_request_adapter). The text logic lives in
trtllm_bdlora.serving.repository.text_models.Preprocessing, which `trtllm-bdlora serve` runs too."""

import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from trtllm_bdlora.adapters.trtllm_format import normalize_request_adapter
from trtllm_bdlora.serving.repository.calls import CallContext
from trtllm_bdlora.serving.repository.text_models import Preprocessing
from trtllm_bdlora.serving.repository.tokens import flag
from trtllm_bdlora.trtllm.engine_dir import engine_lora_info, engine_max_seq_len
from trtllm_bdlora.trtllm.triton_python import bf16_outputs, error_response, inputs_of, parameters, tensors
from trtllm_bdlora.trtllm.triton_repo import engine_shape


class TritonPythonModel:
    def initialize(self, args):
        config, params = parameters(args)
        tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"], legacy=False, padding_side="left",
                                                  trust_remote_code=True)
        tp_size, engine_dir = int(params["tp_size"]), params["gpt_model_path"]
        engine = []  # read on first use: only requests that carry an adapter need the engine's facts

        def lora_check(weights, lora_config):
            if not engine:
                engine.append((engine_shape(engine_dir), engine_lora_info(engine_dir)))
            shape, info = engine[0]
            return normalize_request_adapter(weights, lora_config, shape, tp_size, info.max_lora_rank, info.dtype,
                                             "lora_weights")

        self.model = Preprocessing(tokenizer, flag(params.get("add_special_tokens"), True), lora_check,
                                   max_seq_len=engine_max_seq_len(engine_dir))  # texts too long refused untokenized
        self.bf16 = bf16_outputs(config)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = next(iter(self.model.infer(inputs_of(request), CallContext(request.request_id())))).outputs
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors(pb_utils, outputs, self.bf16)))
            except Exception as err:  # one bad request gets its error; the others are answered
                responses.append(error_response(pb_utils, err))
        return responses

"""Triton Python backend: text -> token ids with the model's Hugging Face tokenizer."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"]["string_value"])
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

    def execute(self, requests):
        responses = []
        for request in requests:
            query = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy()
            out_len = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy()
            ids = [self.tokenizer(q[0].decode())["input_ids"] for q in query]
            width = max(len(i) for i in ids)
            padded = np.array([i + [self.pad_id] * (width - len(i)) for i in ids], dtype=np.int32)
            n = len(ids)
            tensors = [
                pb_utils.Tensor("INPUT_ID", padded),
                pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(i)] for i in ids], dtype=np.int32)),
                pb_utils.Tensor("OUT_END_ID", np.full((n, 1), self.end_id, dtype=np.int32)),
                pb_utils.Tensor("OUT_PAD_ID", np.full((n, 1), self.pad_id, dtype=np.int32)),
                pb_utils.Tensor("REQUEST_OUTPUT_LEN_OUT", out_len.astype(np.int32)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

"""The `preprocessing` and `postprocessing` models: upstream's semantics (see `text.py`) on a tokenizer, run by
`serve` and by the production repository's Python models alike. Multimodal inputs are refused by name.
LORA_WEIGHTS / LORA_CONFIG go through `lora_check`: the production repository puts them in the form the BD-LoRA
engine computes exactly (`adapters/trtllm_format.normalize_request_adapter`); `serve` runs the torch backend,
which serves plain and BD-LoRA request adapters alike, and passes them through."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from trtllm_bdlora.engine.request import check_text_bytes, max_text_bytes
from trtllm_bdlora.errors import InputError, RequestError
from trtllm_bdlora.serving.repository.calls import CallContext, ModelResponse
from trtllm_bdlora.serving.repository.spec import POSTPROCESSING, PREPROCESSING
from trtllm_bdlora.serving.repository.tokens import decode, embedding_bias, encode_queries, special_ids, word_list

MULTIMODAL_INPUTS = ("IMAGE_BYTES", "IMAGE_URL", "IMAGES", "VIDEO_BYTES")


class Preprocessing:
    spec = PREPROCESSING

    def __init__(self, tokenizer, add_special_tokens: bool = True, lora_check=None, max_seq_len: int | None = None):
        if tokenizer is None:
            raise RequestError("this model has no tokenizer: the text models are not served")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len  # when known, texts too long for it are refused before tokenizing
        self.max_text_bytes = max_text_bytes(tokenizer, max_seq_len) if max_seq_len else None
        self.add_special_tokens = add_special_tokens
        self.lora_check = lora_check  # (weights, config) -> (weights, config), or None to pass them through
        self.end_id, self.pad_id = special_ids(tokenizer)

    def infer(self, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        for name in MULTIMODAL_INPUTS:
            if name in inputs and inputs[name].size:
                raise InputError(name, "cannot be honoured: multimodal inputs are not supported by this model")
        query = inputs["QUERY"]
        batch = query.shape[0]
        if self.max_text_bytes is not None:
            for text in query.reshape(-1):
                try:
                    nbytes = len(text) if isinstance(text, bytes) else len(str(text).encode("utf-8", "surrogatepass"))
                    check_text_bytes("text", nbytes, self.max_text_bytes, self.max_seq_len)
                except RequestError as err:
                    raise InputError("QUERY", str(err)[len("text "):]) from None
        end_id = inputs.get("END_ID", np.full((batch, 1), self.end_id, dtype=np.int32))
        pad_id = inputs.get("PAD_ID", np.full((batch, 1), self.pad_id, dtype=np.int32))
        ids, lengths = encode_queries(self.tokenizer, query, self.add_special_tokens, int(pad_id.reshape(-1)[0]))
        if "DECODER_QUERY" in inputs:
            decoder_ids, decoder_lengths = encode_queries(self.tokenizer, inputs["DECODER_QUERY"],
                                                          self.add_special_tokens, int(pad_id.reshape(-1)[0]),
                                                          "DECODER_QUERY")
        else:
            decoder_ids, decoder_lengths = pad_id.astype(np.int32).reshape(batch, 1), np.ones((batch, 1), np.int32)
        out = {
            "INPUT_ID": ids, "REQUEST_INPUT_LEN": lengths, "DECODER_INPUT_ID": decoder_ids,
            "REQUEST_DECODER_INPUT_LEN": decoder_lengths,
            "BAD_WORDS_IDS": word_list(self.tokenizer, inputs.get("BAD_WORDS_DICT"), batch, "BAD_WORDS_DICT"),
            "STOP_WORDS_IDS": word_list(self.tokenizer, inputs.get("STOP_WORDS_DICT"), batch, "STOP_WORDS_DICT"),
            "EMBEDDING_BIAS": embedding_bias(self.tokenizer, inputs.get("EMBEDDING_BIAS_WORDS"),
                                             inputs.get("EMBEDDING_BIAS_WEIGHTS"), batch),
            "REQUEST_OUTPUT_LEN": inputs["REQUEST_OUTPUT_LEN"],
            "OUT_END_ID": np.asarray(end_id, dtype=np.int32).reshape(batch, 1),
            "OUT_PAD_ID": np.asarray(pad_id, dtype=np.int32).reshape(batch, 1),
        }
        if "PROMPT_TABLE_EXTRA_ID" in inputs:
            extra = inputs["PROMPT_TABLE_EXTRA_ID"].reshape(batch, 1).astype(np.uint64)
            out["OUT_PROMPT_TABLE_EXTRA_IDS"] = np.where(ids >= self.tokenizer.vocab_size, extra, 0).astype(np.uint64)
        if ("LORA_WEIGHTS" in inputs) != ("LORA_CONFIG" in inputs):
            raise RequestError("send lora_weights and lora_config together")
        if "LORA_WEIGHTS" in inputs:
            weights, config = inputs["LORA_WEIGHTS"], inputs["LORA_CONFIG"]
            if self.lora_check is not None:
                weights, config = self.lora_check(weights, config)
            out["OUT_LORA_WEIGHTS"], out["OUT_LORA_CONFIG"] = weights, config
        yield ModelResponse(out)


class Postprocessing:
    spec = POSTPROCESSING

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        if tokenizer is None:
            raise RequestError("this model has no tokenizer: the text models are not served")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens

    def infer(self, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        tokens, lengths = inputs["TOKENS_BATCH"], inputs["SEQUENCE_LENGTH"]
        if lengths.shape != tokens.shape[:2]:
            raise InputError("SEQUENCE_LENGTH", f"must have shape {list(tokens.shape[:2])} (TOKENS_BATCH's batch and "
                             f"beams), got {list(lengths.shape)}")
        if (lengths < 0).any() or (lengths > tokens.shape[2]).any():
            raise InputError("SEQUENCE_LENGTH", f"must lie in [0, {tokens.shape[2]}]")
        vocab = len(self.tokenizer)
        for b in range(tokens.shape[0]):
            for k in range(tokens.shape[1]):
                used = tokens[b, k, : int(lengths[b, k])]
                if used.size and (used.min() < 0 or used.max() >= vocab):
                    raise InputError("TOKENS_BATCH", f"ids must lie in [0, {vocab})")
        yield ModelResponse({"OUTPUT": decode(self.tokenizer, tokens, lengths, self.skip_special_tokens)})

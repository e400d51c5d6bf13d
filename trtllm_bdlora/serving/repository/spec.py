"""The one description of the five models of TensorRT-LLM's Triton `inflight_batcher_llm` repository that
`serve` answers for and `fill-model-repo` writes `config.pbtxt` files from: names, data types, dims,
optionality, parameters, and the ensemble's wiring.

Names, data types and dims follow the TensorRT-LLM 1.2.x configs (`triton_backend/all_models/
inflight_batcher_llm/*/config.pbtxt`; see `tests/data/README.md` for the commits read). Our one internal
change: the ensemble routes `lora_weights` / `lora_config` through `preprocessing` (LORA_WEIGHTS ->
OUT_LORA_WEIGHTS, ...), which checks them against the BD-LoRA engine's TP; its external inputs are
upstream's. `${name}` strings are placeholders that `fill-model-repo` (or `serve`) fills.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# data types whose value is a placeholder, with the value used when nothing else is known
TYPE_PLACEHOLDERS = {
    "logits_datatype": "TYPE_FP32",
    "lora_weights_data_type": "TYPE_FP16",
    "prompt_embedding_table_data_type": "TYPE_FP16",
    "encoder_input_features_data_type": "TYPE_FP16",
}
# config data type -> KServe v2 wire data type
WIRE_TYPES = {
    "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_UINT64": "UINT64",
    "TYPE_FP16": "FP16", "TYPE_BF16": "BF16", "TYPE_FP32": "FP32", "TYPE_STRING": "BYTES",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # TYPE_* or "${placeholder}"
    dims: tuple[int, ...]
    optional: bool = False
    scalar: bool = False  # `reshape: { shape: [ ] }` in the config
    ragged: bool = False  # `allow_ragged_batch`


@dataclass(frozen=True)
class Step:
    model: str
    inputs: dict[str, str]  # model input -> ensemble tensor
    outputs: dict[str, str]  # model output -> ensemble tensor


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    backend: str = ""  # "python" | "tensorrtllm" | "${tensorrt_llm_backend}" | "" (ensemble)
    platform: str = ""
    decoupled: bool = False  # model_transaction_policy { decoupled: ${decoupled_mode} }
    parameters: dict[str, str] = field(default_factory=dict)
    instance_count: str = ""  # instance_group count ("" for ensembles)
    dynamic_batching: bool = False
    queue_policy: bool = False  # dynamic_batching with max_queue_delay / default_queue_policy
    steps: tuple[Step, ...] = ()
    forwards: dict[str, str] = field(default_factory=dict)  # output -> the input whose value it carries

    def input(self, name: str) -> Tensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> Tensor | None:
        return next((t for t in self.outputs if t.name == name), None)


def _t(spec: str) -> Tensor:
    """'name TYPE dims [opt] [scalar] [ragged]', e.g. 'end_id INT32 1 opt scalar'."""
    name, dtype, dims, *flags = spec.split()
    data_type = dtype if dtype.startswith("${") else f"TYPE_{dtype}"
    return Tensor(name, data_type, tuple(int(d) for d in dims.split(",")), "opt" in flags, "scalar" in flags,
                  "ragged" in flags)


def _ts(*specs: str) -> tuple[Tensor, ...]:
    return tuple(_t(s) for s in specs)


LORA_WEIGHTS_TYPE = "${lora_weights_data_type}"
LOGITS_TYPE = "${logits_datatype}"

PERF_OUTPUTS = (
    "kv_cache_alloc_new_blocks INT32 1", "kv_cache_reused_blocks INT32 1", "kv_cache_alloc_total_blocks INT32 1",
    "arrival_time_ns INT64 1", "first_scheduled_time_ns INT64 1", "first_token_time_ns INT64 1",
    "last_token_time_ns INT64 1", "acceptance_rate FP32 1", "total_accepted_draft_tokens INT32 1",
    "total_draft_tokens INT32 1", "num_input_tokens INT32 1", "num_output_tokens INT32 1",
)
GENERATION_OUTPUTS = (
    "cum_log_probs FP32 -1", "output_log_probs FP32 -1,-1", f"context_logits {LOGITS_TYPE} -1,-1",
    f"generation_logits {LOGITS_TYPE} -1,-1,-1", "batch_index INT32 1", "sequence_index INT32 1",
)

PREPROCESSING = Model(
    name="preprocessing", backend="python", dynamic_batching=True, queue_policy=True,
    instance_count="${preprocessing_instance_count}",
    inputs=_ts(
        "QUERY STRING 1", "DECODER_QUERY STRING 1 opt", "IMAGE_BYTES UINT8 -1,-1,-1,-1 opt", "IMAGE_URL STRING 1 opt",
        "IMAGES STRING -1 opt", "VIDEO_BYTES UINT8 -1,-1,-1,-1 opt", "REQUEST_OUTPUT_LEN INT32 1",
        "BAD_WORDS_DICT STRING -1 opt", "STOP_WORDS_DICT STRING -1 opt", "EMBEDDING_BIAS_WORDS STRING -1 opt",
        "EMBEDDING_BIAS_WEIGHTS FP32 -1 opt", "END_ID INT32 1 opt", "PAD_ID INT32 1 opt",
        "PROMPT_TABLE_EXTRA_ID UINT64 1 opt",
        f"LORA_WEIGHTS {LORA_WEIGHTS_TYPE} -1,-1 opt ragged", "LORA_CONFIG INT32 -1,3 opt ragged",
    ),
    outputs=_ts(
        "INPUT_ID INT32 -1", "REQUEST_INPUT_LEN INT32 1", "DECODER_INPUT_ID INT32 -1",
        "REQUEST_DECODER_INPUT_LEN INT32 1", "BAD_WORDS_IDS INT32 2,-1", "STOP_WORDS_IDS INT32 2,-1",
        "EMBEDDING_BIAS FP32 -1", "REQUEST_OUTPUT_LEN INT32 -1", "OUT_END_ID INT32 1", "OUT_PAD_ID INT32 1",
        "OUT_PROMPT_TABLE_EXTRA_IDS UINT64 -1", "PIXEL_VALUES FP16 -1,-1,-1,-1", "ASPECT_RATIO_IDS INT64 -1",
        "ASPECT_RATIO_MASK INT64 -1,-1", "CROSS_ATTENTION_MASK INT64 -1,-1,-1", "IMAGE_SIZES INT64 -1,2",
        "IS_VIDEO_INPUT BOOL 1", "ATTENTION_MASK INT64 -1", "IMAGE_GRID_THW INT64 3", "VISION_INPUT_ID INT32 -1",
        f"OUT_LORA_WEIGHTS {LORA_WEIGHTS_TYPE} -1,-1", "OUT_LORA_CONFIG INT32 -1,3",
    ),
    parameters={"tokenizer_dir": "${tokenizer_dir}", "add_special_tokens": "${add_special_tokens}",
                "gpt_model_path": "${engine_dir}", "tp_size": "${tp_size}"},
    forwards={"REQUEST_OUTPUT_LEN": "REQUEST_OUTPUT_LEN", "OUT_END_ID": "END_ID", "OUT_PAD_ID": "PAD_ID",
              "OUT_LORA_WEIGHTS": "LORA_WEIGHTS", "OUT_LORA_CONFIG": "LORA_CONFIG"},
)

TENSORRT_LLM = Model(
    name="tensorrt_llm", backend="${tensorrt_llm_backend}", decoupled=True, dynamic_batching=True, queue_policy=True,
    instance_count="1",
    inputs=_ts(
        "input_ids INT32 -1 opt ragged", "encoder_input_features ${encoder_input_features_data_type} -1,-1 opt ragged",
        "encoder_output_lengths INT32 1 opt scalar", "input_lengths INT32 1 scalar", "request_output_len INT32 1 scalar",
        "num_return_sequences INT32 1 opt scalar", "draft_input_ids INT32 -1 opt ragged",
        "decoder_input_ids INT32 -1 opt ragged", "decoder_input_lengths INT32 1 opt scalar",
        f"draft_logits {LOGITS_TYPE} -1,-1 opt ragged", "draft_acceptance_threshold FP32 1 opt scalar",
        "end_id INT32 1 opt scalar", "pad_id INT32 1 opt scalar", "stop_words_list INT32 2,-1 opt ragged",
        "bad_words_list INT32 2,-1 opt ragged", "embedding_bias FP32 -1 opt ragged", "beam_width INT32 1 opt scalar",
        "temperature FP32 1 opt scalar", "runtime_top_k INT32 1 opt scalar", "runtime_top_p FP32 1 opt scalar",
        "runtime_top_p_min FP32 1 opt scalar", "runtime_top_p_decay FP32 1 opt scalar",
        "runtime_top_p_reset_ids INT32 1 opt scalar", "len_penalty FP32 1 opt scalar", "early_stopping BOOL 1 opt scalar",
        "repetition_penalty FP32 1 opt scalar", "min_tokens INT32 1 opt scalar",
        "beam_search_diversity_rate FP32 1 opt scalar", "presence_penalty FP32 1 opt scalar",
        "frequency_penalty FP32 1 opt scalar", "seed UINT64 1 opt scalar", "return_log_probs BOOL 1 opt scalar",
        "return_context_logits BOOL 1 opt scalar", "return_generation_logits BOOL 1 opt scalar",
        "return_perf_metrics BOOL 1 opt scalar", "return_num_input_tokens BOOL 1 opt scalar",
        "return_num_output_tokens BOOL 1 opt scalar", "exclude_input_in_output BOOL 1 opt scalar",
        "stop BOOL 1 opt scalar", "streaming BOOL 1 opt scalar",
        "prompt_embedding_table ${prompt_embedding_table_data_type} -1,-1 opt ragged",
        "prompt_table_extra_ids UINT64 -1 opt ragged", "prompt_vocab_size INT32 1 opt scalar",
        "cross_attention_mask BOOL -1,-1 opt ragged", "mrope_rotary_cos_sin FP32 -1 opt",
        "mrope_position_deltas INT64 1 opt", "lora_task_id UINT64 1 opt scalar",
        f"lora_weights {LORA_WEIGHTS_TYPE} -1,-1 opt ragged", "lora_config INT32 -1,3 opt ragged",
        "context_phase_params UINT8 -1 opt ragged", "skip_cross_attn_blocks BOOL 1 opt ragged",
        "retention_token_range_starts INT32 -1 opt ragged", "retention_token_range_ends INT32 -1 opt ragged",
        "retention_token_range_priorities INT32 -1 opt ragged", "retention_token_range_durations_ms INT32 -1 opt ragged",
        "retention_decode_priority INT32 1 opt ragged", "retention_decode_duration_ms INT32 1 opt ragged",
        "guided_decoding_guide_type STRING 1 opt ragged", "guided_decoding_guide STRING 1 opt ragged",
        "lookahead_window_size INT32 1 opt ragged", "lookahead_ngram_size INT32 1 opt ragged",
        "lookahead_verification_set_size INT32 1 opt ragged",
    ),
    outputs=_ts("output_ids INT32 -1,-1", "sequence_length INT32 -1", *GENERATION_OUTPUTS[:6],
                "context_phase_params UINT8 -1", *PERF_OUTPUTS),
    parameters={
        "max_beam_width": "1", "FORCE_CPU_ONLY_INPUT_TENSORS": "no", "gpt_model_type": "${batching_strategy}",
        "gpt_model_path": "${engine_dir}", "batch_scheduler_policy": "${batch_scheduler_policy}",
        "kv_cache_free_gpu_mem_fraction": "${kv_cache_free_gpu_mem_fraction}",
        "exclude_input_in_output": "${exclude_input_in_output}", "normalize_log_probs": "${normalize_log_probs}",
        "lora_cache_optimal_adapter_size": "${lora_cache_optimal_adapter_size}",
        "lora_cache_max_adapter_size": "${lora_cache_max_adapter_size}",
        "lora_cache_gpu_memory_fraction": "${lora_cache_gpu_memory_fraction}",
        "lora_cache_host_memory_bytes": "${lora_cache_host_memory_bytes}", "lora_prefetch_dir": "${lora_prefetch_dir}",
        "tokenizer_dir": "${tokenizer_dir}",
    },
)

POSTPROCESSING = Model(
    name="postprocessing", backend="python", dynamic_batching=True, instance_count="${postprocessing_instance_count}",
    inputs=_ts("TOKENS_BATCH INT32 -1,-1", "SEQUENCE_LENGTH INT32 -1"),
    outputs=_ts("OUTPUT STRING -1"),
    parameters={"tokenizer_dir": "${tokenizer_dir}", "skip_special_tokens": "${skip_special_tokens}"},
)

# ensemble / BLS external inputs shared by both (in upstream's order, as the ensemble declares them)
_TEXT_MODEL_INPUTS = (
    "text_input STRING 1", "decoder_text_input STRING 1 opt", "max_tokens INT32 1", "num_return_sequences INT32 1 opt",
    "bad_words STRING -1 opt", "stop_words STRING -1 opt", "exclude_input_in_output BOOL 1 opt", "end_id INT32 1 opt",
    "pad_id INT32 1 opt", "top_k INT32 1 opt", "top_p FP32 1 opt", "temperature FP32 1 opt",
    "length_penalty FP32 1 opt", "repetition_penalty FP32 1 opt", "min_tokens INT32 1 opt",
    "presence_penalty FP32 1 opt", "frequency_penalty FP32 1 opt", "seed UINT64 1 opt",
    "return_log_probs BOOL 1 opt", "return_context_logits BOOL 1 opt", "return_generation_logits BOOL 1 opt",
    "return_perf_metrics BOOL 1 opt", "return_num_input_tokens BOOL 1 opt", "return_num_output_tokens BOOL 1 opt",
    "beam_width INT32 1 opt", "stream BOOL 1 opt", "prompt_embedding_table FP16 -1,-1 opt",
    "prompt_table_extra_id UINT64 1 opt", "prompt_vocab_size INT32 1 opt", "embedding_bias_words STRING -1 opt",
    "embedding_bias_weights FP32 -1 opt", "lora_task_id UINT64 1 opt",
    f"lora_weights {LORA_WEIGHTS_TYPE} -1,-1 opt ragged", "lora_config INT32 -1,3 opt ragged",
    "guided_decoding_guide_type STRING 1 opt ragged", "guided_decoding_guide STRING 1 opt ragged",
)
_TEXT_MODEL_OUTPUTS = ("text_output STRING -1", *GENERATION_OUTPUTS, *PERF_OUTPUTS)


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


_LLM_PASSTHROUGH = _same(
    "exclude_input_in_output", "temperature", "repetition_penalty", "min_tokens", "presence_penalty",
    "frequency_penalty", "seed", "return_log_probs", "return_context_logits", "return_generation_logits",
    "return_perf_metrics", "return_num_input_tokens", "return_num_output_tokens", "num_return_sequences",
    "beam_width", "prompt_embedding_table", "prompt_vocab_size", "lora_task_id", "guided_decoding_guide_type",
    "guided_decoding_guide",
)

ENSEMBLE = Model(
    name="ensemble", platform="ensemble",
    inputs=_ts(*_TEXT_MODEL_INPUTS),
    outputs=_ts(*_TEXT_MODEL_OUTPUTS),
    steps=(
        Step("preprocessing",
             inputs={"QUERY": "text_input", "DECODER_QUERY": "decoder_text_input", "REQUEST_OUTPUT_LEN": "max_tokens",
                     "BAD_WORDS_DICT": "bad_words", "STOP_WORDS_DICT": "stop_words",
                     "EMBEDDING_BIAS_WORDS": "embedding_bias_words", "EMBEDDING_BIAS_WEIGHTS": "embedding_bias_weights",
                     "END_ID": "end_id", "PAD_ID": "pad_id", "PROMPT_TABLE_EXTRA_ID": "prompt_table_extra_id",
                     "LORA_WEIGHTS": "lora_weights", "LORA_CONFIG": "lora_config"},
             outputs={"REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN", "INPUT_ID": "_INPUT_ID",
                      "REQUEST_DECODER_INPUT_LEN": "_REQUEST_DECODER_INPUT_LEN", "DECODER_INPUT_ID": "_DECODER_INPUT_ID",
                      "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN", "STOP_WORDS_IDS": "_STOP_WORDS_IDS",
                      "BAD_WORDS_IDS": "_BAD_WORDS_IDS", "EMBEDDING_BIAS": "_EMBEDDING_BIAS",
                      "OUT_END_ID": "_PREPROCESSOR_END_ID", "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID",
                      "OUT_PROMPT_TABLE_EXTRA_IDS": "_OUT_PROMPT_TABLE_EXTRA_IDS",
                      "OUT_LORA_WEIGHTS": "_LORA_WEIGHTS", "OUT_LORA_CONFIG": "_LORA_CONFIG"}),
        Step("tensorrt_llm",
             inputs={"input_ids": "_INPUT_ID", "decoder_input_ids": "_DECODER_INPUT_ID",
                     "input_lengths": "_REQUEST_INPUT_LEN", "decoder_input_lengths": "_REQUEST_DECODER_INPUT_LEN",
                     "request_output_len": "_REQUEST_OUTPUT_LEN", "end_id": "_PREPROCESSOR_END_ID",
                     "pad_id": "_PREPROCESSOR_PAD_ID", "embedding_bias": "_EMBEDDING_BIAS", "runtime_top_k": "top_k",
                     "runtime_top_p": "top_p", "len_penalty": "length_penalty", "streaming": "stream",
                     "stop_words_list": "_STOP_WORDS_IDS", "bad_words_list": "_BAD_WORDS_IDS",
                     "prompt_table_extra_ids": "_OUT_PROMPT_TABLE_EXTRA_IDS", "lora_weights": "_LORA_WEIGHTS",
                     "lora_config": "_LORA_CONFIG", **_LLM_PASSTHROUGH},
             outputs={"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH",
                      **_same(*(t.split()[0] for t in (*GENERATION_OUTPUTS, *PERF_OUTPUTS)))}),
        Step("postprocessing", inputs={"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
             outputs={"OUTPUT": "text_output"}),
    ),
)

TENSORRT_LLM_BLS = Model(
    name="tensorrt_llm_bls", backend="python", decoupled=True, instance_count="${bls_instance_count}",
    inputs=_ts(*_TEXT_MODEL_INPUTS[:2], "image_input FP16 -1,3,-1,-1 opt", "image_bytes_input UINT8 -1,-1,-1,-1 opt",
               "image_url_input STRING 1 opt", "video_bytes_input UINT8 -1,-1,-1,-1 opt",
               *(s for s in _TEXT_MODEL_INPUTS[2:] if not s.startswith("guided")),
               "num_draft_tokens INT32 1 opt", "use_draft_logits BOOL 1 opt scalar",
               "guided_decoding_guide_type STRING 1 opt", "guided_decoding_guide STRING 1 opt"),
    outputs=_ts(*_TEXT_MODEL_OUTPUTS),
    parameters={"accumulate_tokens": "${accumulate_tokens}", "tensorrt_llm_model_name": "tensorrt_llm"},
)

MODELS: dict[str, Model] = {m.name: m for m in (PREPROCESSING, TENSORRT_LLM, POSTPROCESSING, ENSEMBLE, TENSORRT_LLM_BLS)}

# placeholder values fill-model-repo uses unless told otherwise (engine_dir, tokenizer_dir and tp_size have none)
DEFAULTS = {
    **{k: v for k, v in TYPE_PLACEHOLDERS.items()},
    "tensorrt_llm_backend": "tensorrtllm",  # "python" for a `build --backend torch` directory (fill-model-repo)
    "triton_max_batch_size": "64", "decoupled_mode": "true", "max_queue_delay_microseconds": "0",
    "max_queue_size": "0", "batching_strategy": "inflight_fused_batching", "batch_scheduler_policy": "max_utilization",
    "kv_cache_free_gpu_mem_fraction": "0.9", "exclude_input_in_output": "false", "normalize_log_probs": "true",
    "lora_cache_optimal_adapter_size": "8", "lora_cache_max_adapter_size": "64",
    "lora_cache_gpu_memory_fraction": "0.05", "lora_cache_host_memory_bytes": str(1 << 30),
    "lora_prefetch_dir": "",  # none: the backend skips a directory that does not exist
    "add_special_tokens": "true", "skip_special_tokens": "true", "accumulate_tokens": "false",
    "preprocessing_instance_count": "1", "postprocessing_instance_count": "1", "bls_instance_count": "1",
}

"""The `tensorrt_llm` model: TensorRT-LLM's Triton backend semantics (triton_backend/inflight_batcher_llm/src
utils.cc / model_instance_state.cc) on the runtime.

- One executor request per batch row and returned sequence; with a decoupled call, each finished sequence (or,
  when streaming, each token) is its own response, `batch_index` / `sequence_index` present when the batch
  or `num_return_sequences` is above 1, and only the request's last response flagged final.
- Streaming responses carry the new token only; otherwise output ids include the prompt unless
  `exclude_input_in_output` (the request's, else the model parameter). The end id is never returned: a
  sequence that ends on it gets a last response without tokens when streaming.
- Sampling is TensorRT-LLM's: temperature 1, greedy unless runtime_top_k > 1 or runtime_top_p > 0 (top_p
  <= 0 means unset), seed 0; no end id means no stop on a token.
- Inputs this server cannot honour get a per-request error naming them unless sent at a neutral value.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trtllm_bdlora.engine.guided import Guide, attach_guide
from trtllm_bdlora.engine.request import MAX_SEED, Request, SamplingParams, build_request, check_number
from trtllm_bdlora.engine.runtime import Runtime, Submission
from trtllm_bdlora.errors import InputError, RequestError
from trtllm_bdlora.serving.repository.calls import CallContext, ModelResponse, scalar
from trtllm_bdlora.serving.repository.spec import TENSORRT_LLM
from trtllm_bdlora.serving.repository.tokens import parse_word_list

POLL_S = 0.25
MAX_LORA_WEIGHT = 65504.0  # float16's largest value: TensorRT-LLM engines hold adapter weights in fp16 / bf16
# inputs with no effect at beam width 1, or hints that do not change outputs: accepted at any value
NO_EFFECT = ("len_penalty", "early_stopping", "beam_search_diversity_rate", "draft_acceptance_threshold",
             "runtime_top_p_min", "runtime_top_p_reset_ids", "decoder_input_ids", "decoder_input_lengths",
             "prompt_table_extra_ids", "prompt_vocab_size", "retention_token_range_starts",
             "retention_token_range_ends", "retention_token_range_priorities", "retention_token_range_durations_ms",
             "retention_decode_priority", "retention_decode_duration_ms")
# inputs this server cannot honour unless empty: (name, why)
NOT_SUPPORTED = (
    ("draft_input_ids", "speculative decoding (draft tokens) is not supported"),
    ("draft_logits", "speculative decoding (draft tokens) is not supported"),
    ("encoder_input_features", "encoder-decoder models are not supported"),
    ("encoder_output_lengths", "encoder-decoder models are not supported"),
    ("prompt_embedding_table", "prompt tuning (p-tuning tables) is not supported"),
    ("cross_attention_mask", "cross attention (multimodal models) is not supported"),
    ("skip_cross_attn_blocks", "cross attention (multimodal models) is not supported"),
    ("mrope_rotary_cos_sin", "multimodal rotary embeddings are not supported"),
    ("mrope_position_deltas", "multimodal rotary embeddings are not supported"),
    ("context_phase_params", "disaggregated serving is not supported"),
    ("lookahead_window_size", "lookahead decoding is not configured on this server"),
    ("lookahead_ngram_size", "lookahead decoding is not configured on this server"),
    ("lookahead_verification_set_size", "lookahead decoding is not configured on this server"),
)


# the request model's fields (engine/request.py) under the names this model's clients send them by
FIELD_NAMES = {"max_tokens": "request_output_len", "top_p": "runtime_top_p", "top_k": "runtime_top_k",
               "prompt_ids": "input_ids"}


def _value(inputs, name, row, default, kind=float, low=None, high=None, low_open=False):
    return check_number(name, scalar(inputs, name, row, default), kind, low, high, low_open)


def _flag(inputs, name, row, default=False) -> bool:
    return bool(scalar(inputs, name, row, default))


# TensorRT-LLM's guided decoding guide types (executor GuidedDecodingParams), all served by xgrammar (engine/guided.py)
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")


def _text(inputs, name: str, row: int) -> str:
    value = scalar(inputs, name, row)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ("" if value is None else str(value))


def guide_input(inputs: dict[str, np.ndarray], row: int) -> Guide | None:
    """`guided_decoding_guide_type` / `guided_decoding_guide` of batch row `row` as a guide (None: not guided)."""
    kind = _text(inputs, "guided_decoding_guide_type", row)
    if not kind:
        return None
    if kind not in GUIDE_TYPES:
        raise InputError("guided_decoding_guide_type", f"must be one of {', '.join(GUIDE_TYPES)}, got {kind!r}")
    text = _text(inputs, "guided_decoding_guide", row)
    if kind != "json" and not text:
        raise InputError("guided_decoding_guide", f"is needed with guided_decoding_guide_type {kind}")
    return Guide(kind, text)


def unsupported_input(inputs: dict[str, np.ndarray]) -> InputError | None:
    for name, why in NOT_SUPPORTED:
        if name in inputs and inputs[name].size:
            return InputError(name, f"cannot be honoured: {why}")
    decay = scalar(inputs, "runtime_top_p_decay")
    if decay is not None and decay != 1.0:
        return InputError("runtime_top_p_decay", f"cannot be honoured: top-p decay is not supported (send 1.0), got {decay}")
    beams = [int(b) for b in inputs.get("beam_width", np.ones(1)).reshape(-1) if int(b) != 1]
    if beams:
        return InputError("beam_width", f"cannot be honoured: beam search is not supported (send 1), got {beams[0]}")
    return None


@dataclass
class Sequence:
    """One executor request: batch row `row`, returned sequence `index`."""

    row: int
    index: int
    request: Request
    exclude_input: bool
    lora: tuple | None = None
    pad_id: int = 0
    perf_metrics: bool = False
    num_input_tokens: bool = False
    num_output_tokens: bool = False
    sent: int = 0  # tokens already streamed
    done: bool = False  # its last response is out
    observed: bool = False  # reported to on_finished

    @property
    def tokens(self) -> list[int]:
        """Generated tokens to return (the end token never is)."""
        ids = self.request.output_ids
        return ids[:-1] if self.request.finish_reason == "end_id" else ids


def check_not_decoupled(inputs: dict[str, np.ndarray]) -> None:
    """What the TensorRT-LLM backend refuses of a model that is not decoupled (utils.cc createRequestsFromInputTensors):
    a batch of requests, and streaming."""
    if "input_lengths" in inputs and inputs["input_lengths"].shape[0] > 1:
        raise InputError("input_ids", f"has a batch of {inputs['input_lengths'].shape[0]} requests: batch size > 1 "
                         "requires the tensorrt_llm model to use the decoupled transaction policy (decoupled_mode=true)")
    if _flag(inputs, "streaming", 0):
        raise InputError("streaming", "is only supported if the tensorrt_llm model is deployed in decoupled mode "
                         "(decoupled_mode=true)")


class CoreModel:
    spec = TENSORRT_LLM

    def __init__(self, runtime: Runtime, exclude_input_in_output: bool = False, normalize_log_probs: bool = True,
                 on_finished=None, decoupled: bool = True):
        self.runtime = runtime
        self.decoupled = decoupled  # the model's transaction policy (decoupled_mode), whatever the call's transport
        self.on_finished = on_finished  # (request, ctx) for each finished sequence
        self.engine = runtime.engine
        self.exclude_input_default = exclude_input_in_output
        self.normalize_log_probs = normalize_log_probs
        self._active: dict[str, list[Request]] = {}  # request id -> running requests, for `stop`

    # ------------------------------------------------------------------ parsing
    def sequences(self, inputs: dict[str, np.ndarray], ctx: CallContext) -> list[Sequence]:
        """Validate every row and build its requests; nothing is submitted on error."""
        error = unsupported_input(inputs)
        if error is not None:
            raise error
        if "input_ids" not in inputs:
            raise RequestError("input_ids or encoder_input_features is not present in the request")
        lengths = inputs["input_lengths"].reshape(-1)
        ids_rows = inputs["input_ids"].reshape(inputs["input_ids"].shape[0], -1)
        if ids_rows.shape[0] != lengths.shape[0]:
            raise InputError("input_ids", f"has {ids_rows.shape[0]} rows for {lengths.shape[0]} input_lengths")
        out = []
        for row in range(lengths.shape[0]):
            n = _value(inputs, "num_return_sequences", row, 1, int, low=1, high=64)
            if n > 1 and not ctx.decoupled:
                raise InputError("num_return_sequences", "above 1 needs a decoupled (streaming) call, as the "
                                 "TensorRT-LLM backend sends one response per sequence")
            for index in range(n):
                out.append(self._sequence(inputs, row, index, int(lengths[row]), ids_rows[row]))
        return out

    def _sequence(self, inputs, row: int, index: int, length: int, ids_row: np.ndarray) -> Sequence:
        engine = self.engine
        if not 0 < length <= ids_row.shape[0]:
            raise InputError("input_lengths", f"must be in [1, {ids_row.shape[0]}] (the input_ids width), got {length}")
        top_p = _value(inputs, "runtime_top_p", row, 0.0, low=0.0, high=1.0)
        top_k = _value(inputs, "runtime_top_k", row, 0, int, low=0)
        if top_k == 0 and top_p <= 0.0:
            top_k = 1  # TensorRT-LLM: no top-k and no top-p means greedy
        seed = _value(inputs, "seed", row, 0, int, low=0, high=MAX_SEED)
        end_id = scalar(inputs, "end_id", row)
        params = SamplingParams(
            max_tokens=scalar(inputs, "request_output_len", row), temperature=scalar(inputs, "temperature", row, 1.0),
            top_p=top_p if top_p > 0.0 else 1.0, top_k=top_k, seed=(seed + index * 0x9E3779B97F4A7C15) % (MAX_SEED + 1),
            repetition_penalty=scalar(inputs, "repetition_penalty", row, 1.0),
            presence_penalty=scalar(inputs, "presence_penalty", row, 0.0),
            frequency_penalty=scalar(inputs, "frequency_penalty", row, 0.0), min_tokens=scalar(inputs, "min_tokens", row, 0),
            end_ids=frozenset() if end_id is None else frozenset({int(end_id)}),
            stop_words=self._words(inputs, "stop_words_list", row), bad_words=self._words(inputs, "bad_words_list", row),
            embedding_bias=self._bias(inputs, row), normalize_log_probs=self.normalize_log_probs,
            return_log_probs=_flag(inputs, "return_log_probs", row),
            return_context_logits=_flag(inputs, "return_context_logits", row),
            return_generation_logits=_flag(inputs, "return_generation_logits", row), guide=guide_input(inputs, row),
        )
        req = build_request(ids_row[:length].tolist(), params, vocab_size=engine.shape.vocab_size,
                            max_seq_len=engine.max_seq_len, adapter=int(scalar(inputs, "lora_task_id", row, 0)) or None,
                            names=FIELD_NAMES)
        attach_guide(req, engine.tokenizer, engine.shape.vocab_size, engine.eos_ids, "guided_decoding_guide")
        exclude = scalar(inputs, "exclude_input_in_output", row)
        return Sequence(row, index, req, self.exclude_input_default if exclude is None else bool(exclude),
                        self._lora(inputs, row), int(scalar(inputs, "pad_id", row, end_id or 0)),
                        _flag(inputs, "return_perf_metrics", row), _flag(inputs, "return_num_input_tokens", row),
                        _flag(inputs, "return_num_output_tokens", row))

    @staticmethod
    def _words(inputs, name: str, row: int) -> tuple[tuple[int, ...], ...]:
        array = inputs.get(name)
        if array is None or array.size == 0:
            return ()
        try:
            return parse_word_list(array[row if array.shape[0] > 1 else 0])
        except RequestError as err:
            raise InputError(name, str(err)) from None

    def _bias(self, inputs, row: int) -> torch.Tensor | None:
        array = inputs.get("embedding_bias")
        if array is None or array.size == 0:
            return None
        values = array.reshape(array.shape[0], -1)[row if array.shape[0] > 1 else 0]
        vocab = self.engine.shape.vocab_size
        if values.shape[0] > vocab:
            raise InputError("embedding_bias", f"has {values.shape[0]} entries for a vocabulary of {vocab}")
        if not np.isfinite(values).all():
            raise InputError("embedding_bias", "must be finite")
        bias = torch.zeros(vocab, dtype=torch.float64)
        bias[: values.shape[0]] = torch.from_numpy(values.astype(np.float64))
        return bias

    @staticmethod
    def _lora(inputs, row: int) -> tuple | None:
        weights, config = inputs.get("lora_weights"), inputs.get("lora_config")
        if weights is None and config is None:
            return None
        if weights is None or config is None:
            raise RequestError("send lora_weights and lora_config together")
        if weights.size and weights.dtype.kind == "f":  # bf16 arrives as float32: every served type is checked
            if not np.isfinite(weights).all():
                raise InputError("lora_weights", "must be finite (NaN or infinity found)")
            largest = float(np.abs(weights).max())
            if largest > MAX_LORA_WEIGHT:
                raise InputError("lora_weights", f"holds {largest:g}, beyond {MAX_LORA_WEIGHT:g} (the largest float16): "
                                 "an adapter scale this large overflows the activations")
        if weights.ndim == 3 and weights.shape[0] > 1:
            return weights[row], config[row]
        return weights, config

    # ------------------------------------------------------------------ running
    def infer(self, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        if _flag(inputs, "stop", 0):
            for req in self._active.get(ctx.request_id, []):
                self.runtime.cancel(req)
            yield ModelResponse({}, final=True)
            return
        if not self.decoupled:
            check_not_decoupled(inputs)
        seqs = self.sequences(inputs, ctx)
        streaming = _flag(inputs, "streaming", 0) and ctx.decoupled
        events: queue.Queue = queue.Queue()
        submitted = []
        try:
            for key, seq in enumerate(seqs):
                seq.request.id = ctx.request_id or None
                # the token and whether it ended the sequence, as the engine saw them then (a slow reader must
                # still send one token per response, and the same last one)
                seq.request.on_token = lambda token, k=key, r=seq.request: events.put((k, False, (token, r.finish_reason)))
                seq.request.client_gone = ctx.is_cancelled  # disconnect, deadline: leave at the next step
                weights, config = seq.lora if seq.lora is not None else (None, None)
                self.runtime.submit(Submission(seq.request, weights, config,
                                               lambda ids, err, k=key: events.put((k, True, err)),
                                               model=ctx.model or self.spec.name))
                submitted.append(seq.request)
            if ctx.request_id:
                self._active[ctx.request_id] = submitted
            yield from self._responses(seqs, events, inputs, ctx, streaming)
        finally:
            for req in submitted:
                if not req.finish_reason:
                    self.runtime.cancel(req)
            if ctx.request_id and self._active.get(ctx.request_id) is submitted:
                del self._active[ctx.request_id]

    def _responses(self, seqs, events, inputs, ctx, streaming) -> Iterator[ModelResponse]:
        waiting = len(seqs)  # sequences whose on_done has not come
        unsent = len(seqs)  # sequences whose last response is not out: the request's final one empties this
        batch = int(inputs["input_lengths"].shape[0])
        n_seq = max(s.index for s in seqs) + 1
        while waiting:
            try:
                key, done, payload = events.get(timeout=POLL_S)
            except queue.Empty:
                if ctx.is_cancelled():
                    return
                continue
            seq = seqs[key]
            if not done:  # on_token
                if streaming and not seq.done:
                    token, reason = payload
                    tokens = [] if reason == "end_id" else [token]  # the end token is never returned
                    start, seq.sent = seq.sent, seq.sent + len(tokens)
                    if reason is not None:
                        seq.done, unsent = True, unsent - 1
                        self._observe(seq, ctx)
                    if tokens or seq.done:
                        yield ModelResponse(self._outputs(seq, start, tokens, batch, n_seq), final=unsent == 0)
                continue
            if payload is not None:  # on_done: the sequence failed with this error (else it finished)
                raise payload
            waiting -= 1
            self._observe(seq, ctx)
            if ctx.decoupled and not seq.done:  # not streamed, or cancelled before its first token
                seq.done, unsent = True, unsent - 1
                outputs = self._outputs(seq, 0, [], batch, n_seq) if streaming else self._full(seq, batch, n_seq)
                yield ModelResponse(outputs, final=unsent == 0)
        if not ctx.decoupled:
            yield ModelResponse(merge([self._full(s, batch, n_seq) for s in seqs], [s.pad_id for s in seqs]))

    def _observe(self, seq: Sequence, ctx: CallContext) -> None:
        if self.on_finished is not None and not seq.observed:
            seq.observed = True
            self.on_finished(seq.request, ctx)

    # ------------------------------------------------------------------ outputs
    def _full(self, seq: Sequence, batch: int, n_seq: int) -> dict[str, np.ndarray]:
        tokens = seq.tokens
        ids = tokens if seq.exclude_input else seq.request.prompt_ids + tokens
        out = self._outputs(seq, 0, tokens, batch, n_seq)
        out["output_ids"] = np.array([[ids]], dtype=np.int32).reshape(1, 1, len(ids))
        out["sequence_length"] = np.array([[len(ids)]], dtype=np.int32)
        return out

    def _outputs(self, seq: Sequence, start: int, tokens: list[int], batch: int, n_seq: int) -> dict[str, np.ndarray]:
        """Outputs for generated tokens [start, start + len(tokens)) of a sequence."""
        req = seq.request
        end = start + len(tokens)
        out = {"output_ids": np.array(tokens, dtype=np.int32).reshape(1, 1, len(tokens)),
               "sequence_length": np.array([[len(tokens)]], dtype=np.int32)}
        if req.params.return_log_probs:
            out["cum_log_probs"] = np.array([[sum(req.output_log_probs[:end])]], dtype=np.float32)
            out["output_log_probs"] = np.array(req.output_log_probs[start:end], dtype=np.float32).reshape(1, 1, -1)
        if req.params.return_context_logits and req.context_logits is not None:  # every response (TensorRT-LLM's results)
            out["context_logits"] = req.context_logits.float().numpy()[None]
        if req.params.return_generation_logits:
            rows = req.generation_logits[start:end]
            stacked = torch.stack(rows).float().numpy() if rows else np.zeros((0, self.engine.shape.vocab_size), np.float32)
            out["generation_logits"] = stacked[None, None]
        if batch > 1:
            out["batch_index"] = np.array([[seq.row]], dtype=np.int32)
        if n_seq > 1:
            out["sequence_index"] = np.array([[seq.index]], dtype=np.int32)
        if seq.perf_metrics:  # the KV cache of a sequence is one contiguous allocation here: one block, never reused
            one = np.ones((1, 1), dtype=np.int32)
            out.update(kv_cache_alloc_new_blocks=one, kv_cache_reused_blocks=0 * one, kv_cache_alloc_total_blocks=one,
                       acceptance_rate=np.zeros((1, 1), np.float32), total_accepted_draft_tokens=0 * one,
                       total_draft_tokens=0 * one)
            for key in ("arrival", "first_scheduled", "first_token", "last_token"):
                out[f"{key}_time_ns"] = np.array([[req.times_ns.get(key, 0)]], dtype=np.int64)
        if seq.num_input_tokens:
            out["num_input_tokens"] = np.array([[len(req.prompt_ids)]], dtype=np.int32)
        if seq.num_output_tokens:
            out["num_output_tokens"] = np.array([[end]], dtype=np.int32)
        return out


def merge(responses: list[dict[str, np.ndarray]], pad_ids: list[int]) -> dict[str, np.ndarray]:
    """One response for a whole non-decoupled batch: rows stacked, ragged outputs padded (output ids with the
    row's pad id)."""
    if len(responses) == 1:
        return responses[0]
    out = {}
    for name in responses[0]:
        arrays = [r[name] for r in responses]
        if arrays[0].ndim > 2:
            axis = 2 if name in ("output_ids", "output_log_probs", "generation_logits") else 1
            width = max(a.shape[axis] for a in arrays)
            arrays = [np.pad(a, [(0, width - a.shape[axis]) if d == axis else (0, 0) for d in range(a.ndim)],
                             constant_values=pad if name == "output_ids" else 0) for a, pad in zip(arrays, pad_ids)]
        out[name] = np.concatenate(arrays, axis=0)
    return out

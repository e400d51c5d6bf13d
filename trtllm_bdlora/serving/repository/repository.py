"""The five served models behind one entry point, as Triton holds a repository: lookup, readiness, the
checks of a request against the model configuration, requested outputs, and per-model metrics (an ensemble's
composing models count their own requests, as in Triton)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from trtllm_bdlora.engine.runtime import Runtime
from trtllm_bdlora.errors import BdLoraError, ModelNotFound, RequestError, UnimplementedError
from trtllm_bdlora.serving.metrics import Metrics
from trtllm_bdlora.serving.repository.calls import CallContext, InferRequest, ModelResponse, ServedModel, check_inputs
from trtllm_bdlora.serving.repository.config import model_config, model_metadata, triton_normalized
from trtllm_bdlora.serving.repository.core import CoreModel
from trtllm_bdlora.serving.repository.ensemble import Bls, Ensemble
from trtllm_bdlora.serving.repository.lifecycle import ModelStates
from trtllm_bdlora.serving.repository.spec import DEFAULTS, MODELS
from trtllm_bdlora.serving.repository.text_models import Postprocessing, Preprocessing
from trtllm_bdlora.serving.repository.tokens import flag
from trtllm_bdlora.serving.repository.trace import Trace, Tracer
from trtllm_bdlora.serving.repository.values import engine_values

NO_TOKENIZER = "the model has no tokenizer"


def serve_values(model_dir: str, model_name: str, tp: int, overrides: dict[str, str] | None = None) -> dict:
    """Placeholder values for the models `serve` answers for: the repository fill-model-repo writes for the same
    directory (a torch build's tensorrt_llm is our Python-backend model), whatever the runtime's in-flight batch size.
    The model's directories (gpt_model_path, tokenizer_dir) show as its name: clients never see host paths."""
    return {**DEFAULTS, **engine_values(model_dir), "engine_dir": model_name, "tokenizer_dir": model_name,
            "tp_size": str(tp), "tensorrt_llm_backend": "python", **(overrides or {})}


def repository_settings(items: tuple[str, ...] | list[str] | None) -> dict[str, str]:
    """`--set KEY=VALUE` flags as placeholder values of the repository `serve` answers as (the keys fill-model-repo
    takes that describe the repository rather than the engine directory)."""
    settings = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BdLoraError(f"--set takes KEY=VALUE, got {item!r}")
        if key not in DEFAULTS:
            raise BdLoraError(f"--set {key}: not a repository setting (one of {', '.join(sorted(DEFAULTS))})")
        settings[key] = value
    values = {**DEFAULTS, "engine_dir": "-", "tokenizer_dir": "-", "tp_size": "1", **settings}
    for model in MODELS.values():
        model_config(model, values)  # a value the configs cannot take fails here, once
    return settings


class ModelServer:
    def __init__(self, runtime: Runtime, values: dict[str, str], metrics: Metrics | None = None):
        self.runtime, self.values = runtime, values
        self.metrics = metrics or Metrics()
        self.max_batch_size = int(values["triton_max_batch_size"])
        tokenizer = runtime.engine.tokenizer
        core = CoreModel(runtime, flag(values.get("exclude_input_in_output"), False),
                         flag(values.get("normalize_log_probs"), True), on_finished=self._finished,
                         decoupled=flag(values.get("decoupled_mode"), True))
        self.models: dict[str, ServedModel] = {"tensorrt_llm": core}
        if tokenizer is not None:
            self.models["preprocessing"] = Preprocessing(tokenizer, flag(values.get("add_special_tokens"), True),
                                                         max_seq_len=runtime.engine.max_seq_len)
            self.models["postprocessing"] = Postprocessing(tokenizer, flag(values.get("skip_special_tokens"), True))
            self.models["ensemble"] = Ensemble(self.dispatch)
            self.models["tensorrt_llm_bls"] = Bls(Ensemble(self.dispatch), flag(values.get("accumulate_tokens"), False))
        self.configs = triton_normalized({name: model_config(MODELS[name], values) for name in self.models})
        self.metadata = {name: model_metadata(MODELS[name], values) for name in self.models}
        self.states = ModelStates(self.models, {name: {step.model for step in MODELS[name].steps} for name in self.models},
                                  {name: NO_TOKENIZER for name in MODELS if name not in self.models})
        self.tracer = Tracer(self.models)
        self.metrics.declare(self.models)

    # ------------------------------------------------------------------ repository
    def ready(self, name: str, version: str = "") -> bool:
        return name in self.models and version in ("", "1") and self.states.available(name) and self.runtime.healthy

    def model(self, name: str, version: str = "") -> ServedModel:
        if name not in self.models or version not in ("", "1"):
            raise ModelNotFound(f"Request for unknown model: '{name}'{f' version {version}' if version else ''} is "
                                "not found")  # Triton's words
        if not self.states.available(name):  # Triton's words for a model of the repository that is not loaded
            raise ModelNotFound(f"Request for unknown model: '{name}' has no available versions")
        return self.models[name]

    def decoupled(self, name: str, version: str = "") -> bool:
        """Whether the model answers a request with any number of responses (its model_transaction_policy): Triton
        refuses unary calls to such a model."""
        self.model(name, version)
        return self.configs[name].model_transaction_policy.decoupled

    def statistics_model(self, name: str, version: str = "") -> None:
        """Raise as Triton's statistics endpoint does for an unknown (NOT_FOUND) or unloaded (INVALID_ARGUMENT) model."""
        if name in self.models and not self.states.available(name):
            raise RequestError(f"requested model '{name}' is not available")
        self.model(name, version)

    def index(self) -> list[dict]:
        return [{"name": name, "version": "1", "state": state, "reason": reason}
                for name in sorted(MODELS) for state, reason in [self.states.state(name)]]

    def load(self, name: str, parameters: dict | None = None) -> None:
        """Triton's repository load (lifecycle.py); a `config` or `file:` parameter (a new configuration or model
        files) is refused: this server's models are fixed by its flags."""
        for key in parameters or {}:
            if key == "config" or key.startswith("file:"):
                raise UnimplementedError(f"load parameter '{key}' is not supported: this server's models are fixed by "
                                         "serve's flags")
            raise RequestError(f"unrecognized load parameter '{key}'.", param=key)
        self.states.load(name)

    def unload(self, name: str, unload_dependents: bool = False) -> None:
        self.states.unload(name, unload_dependents)

    def _finished(self, request, ctx: CallContext) -> None:
        times = request.times_ns
        if "arrival" in times:
            waited = times.get("first_scheduled", times["arrival"]) - times["arrival"]
            ctx.queued_ns = max(ctx.queued_ns, waited)
        self.metrics.tokens("tensorrt_llm", len(request.prompt_ids), len(request.output_ids),
                            ctx.call.protocol if ctx.call is not None else None)

    # ------------------------------------------------------------------ inference
    def infer(self, request: InferRequest, ctx: CallContext, version: str = "") -> Iterator[ModelResponse]:
        """A client's request: checked as Triton checks it, then run; responses carry the requested outputs."""
        model = self.model(request.model, version)
        ctx.model = ctx.model or request.model
        ctx.decoupled = ctx.decoupled and self.decoupled(request.model)  # a stream to a non-decoupled model: one response
        trace_id = self.tracer.sample(request.model)
        trace = Trace(trace_id, request.model, request.id) if trace_id is not None else None
        started = time.perf_counter_ns()
        try:
            inputs = check_inputs(model.spec, request.inputs, self.values, self.max_batch_size, request.id)
            if request.outputs is not None:
                for name in request.outputs:
                    if model.spec.output(name) is None:
                        raise RequestError(f"unexpected inference output '{name}' for model '{request.model}'")
        except RequestError:
            self.metrics.failed(request.model, "REJECTED")
            raise
        self.metrics.input_time(request.model, time.perf_counter_ns() - started)
        wanted = set(request.outputs) if request.outputs is not None else None
        if trace is not None:
            trace.checked = time.perf_counter_ns()
        try:
            for response in self.dispatch(request.model, inputs, ctx):
                if wanted is not None:
                    response = ModelResponse({k: v for k, v in response.outputs.items() if k in wanted}, response.final,
                                             response.parameters)
                if ctx.call is not None and response.outputs:
                    ctx.call.responded()
                if trace is not None:
                    trace.last_response = time.perf_counter_ns()
                yield response
        finally:
            if trace is not None:
                trace.write(ctx.queued_ns)

    def dispatch(self, name: str, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        """Run one model (a client's request, or an ensemble step), with its metrics."""
        model = self.model(name)
        batch = next((a.shape[0] for a in inputs.values() if a.ndim), 1)
        record, queued_before = self.metrics.start(name, batch), ctx.queued_ns
        try:
            for response in model.infer(inputs, ctx):
                record.responded()
                if response.final:  # done, whatever the caller does with the generator next
                    record.finish(None, ctx.queued_ns - queued_before)
                yield response
        except RequestError:
            record.finish("BACKEND")
            raise
        except GeneratorExit:
            record.finish("CANCELED")
            raise
        except Exception:
            record.finish("OTHER")
            raise
        record.finish(None, ctx.queued_ns - queued_before)

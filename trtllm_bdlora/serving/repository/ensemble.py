"""`ensemble` and `tensorrt_llm_bls`: the chain preprocessing -> tensorrt_llm -> postprocessing.

The ensemble runs the wiring of its description (`interface.ENSEMBLE.steps`) as Triton's ensemble scheduler
does: a step gets the tensors its input map names that exist; every response of a step (the core model
streams) runs the rest of the chain; the ensemble answers with the outputs it declares. A bad value is
reported under the name the client sent (a step's input traced back through the wiring).

The BLS model runs the same chain with upstream's additions (tensorrt_llm_bls/1/model.py): stop words are
also matched on the text (streaming: text after a completed stop word is blanked and the request cancelled
once every sequence stopped; otherwise the text is cut after the first stop word following the prompt), and
`accumulate_tokens` streams the whole text so far instead of each token's text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from trtllm_bdlora.errors import InputError, RequestError
from trtllm_bdlora.serving.repository.calls import CallContext, ModelResponse, scalar
from trtllm_bdlora.serving.repository.spec import ENSEMBLE, MODELS, TENSORRT_LLM_BLS, Model

Dispatch = Callable[[str, dict[str, np.ndarray], CallContext], Iterator[ModelResponse]]
# what Triton's ensemble scheduler puts in the parameters of every response (the request's sequence fields)
SEQUENCE_PARAMETERS = {"sequence_id": 0, "sequence_start": False, "sequence_end": False}


class Ensemble:
    def __init__(self, dispatch: Dispatch, spec: Model = ENSEMBLE):
        self.spec, self.dispatch = spec, dispatch

    def infer(self, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        yield from self._run(0, dict(inputs), ctx)

    def _run(self, k: int, tensors: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        if k == len(self.spec.steps):
            yield ModelResponse({t.name: tensors[t.name] for t in self.spec.outputs if t.name in tensors},
                                parameters=dict(SEQUENCE_PARAMETERS))
            return
        step = self.spec.steps[k]
        step_inputs = {name: tensors[t] for name, t in step.inputs.items() if t in tensors}
        try:
            for response in self.dispatch(step.model, step_inputs, ctx):
                if not response.outputs:  # a completion flag only: nothing to run the rest of the chain on
                    yield response
                    continue
                produced = dict(tensors)
                produced.update({t: response.outputs[name] for name, t in step.outputs.items() if name in response.outputs})
                for rest in self._run(k + 1, produced, ctx):
                    yield ModelResponse(rest.outputs, final=response.final and rest.final, parameters=rest.parameters)
        except InputError as err:
            source = self.source(k, err.input)
            if source is None or source == err.input:
                raise
            raise InputError(source, err.reason) from None

    def source(self, k: int, model_input: str) -> str | None:
        """The ensemble input whose value reached step k's `model_input`, if the wiring carries it unchanged."""
        tensor = self.spec.steps[k].inputs.get(model_input)
        while tensor is not None and self.spec.input(tensor) is None:
            for j in range(k - 1, -1, -1):
                step = self.spec.steps[j]
                output = next((o for o, t in step.outputs.items() if t == tensor), None)
                if output is not None:
                    carried = MODELS[step.model].forwards.get(output)
                    tensor, k = (step.inputs.get(carried) if carried else None), j
                    break
            else:
                return None
        return tensor


class Bls:
    spec = TENSORRT_LLM_BLS

    def __init__(self, ensemble: Ensemble, accumulate_tokens: bool = False):
        self.ensemble, self.accumulate = ensemble, accumulate_tokens

    def infer(self, inputs: dict[str, np.ndarray], ctx: CallContext) -> Iterator[ModelResponse]:
        for name in ("image_input", "image_bytes_input", "image_url_input", "video_bytes_input"):
            if name in inputs and inputs[name].size:
                raise InputError(name, "cannot be honoured: multimodal inputs are not supported by this model")
        if (scalar(inputs, "num_draft_tokens") or 0) > 0:
            raise InputError("num_draft_tokens", "cannot be honoured: cannot perform speculative decoding without "
                             "draft model")
        chain_inputs = {k: v for k, v in inputs.items() if ENSEMBLE.input(k) is not None}
        streaming = bool(scalar(inputs, "stream", 0, False)) and ctx.decoupled
        chain = ctx.child()
        yield from self._texts(inputs, chain_inputs, chain, streaming)
        yield ModelResponse({}, final=True)  # as upstream's BLS: every data response unflagged, then an empty final

    def _texts(self, inputs, chain_inputs, chain, streaming: bool) -> Iterator[ModelResponse]:
        batch = inputs["text_input"].shape[0]
        stop_words = [[w.decode() if isinstance(w, bytes) else str(w) for w in row if w]
                      for row in inputs["stop_words"]] if "stop_words" in inputs else [[] for _ in range(batch)]
        state: dict[tuple[int, int], _StopState] = {}
        accumulated: dict[tuple[int, int], str] = {}
        stopped: set[tuple[int, int]] = set()
        for response in self.ensemble.infer(chain_inputs, chain):
            out = dict(response.outputs)
            if not out:
                continue
            key = (_index(out, "batch_index"), _index(out, "sequence_index"))
            if key in stopped:
                continue
            if "text_output" in out:
                texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)
                         for t in out["text_output"].reshape(-1)]
                if streaming and self.accumulate:
                    accumulated[key] = accumulated.get(key, "") + texts[0]
                    texts = [accumulated[key]]
                words = stop_words[key[0] if len(stop_words) > 1 else 0] if stop_words else []
                if words and streaming:
                    st = state.setdefault(key, _StopState())
                    texts = [st.feed(t, words) for t in texts]
                    done = st.stopped
                elif words:
                    prompt = inputs["text_input"].reshape(-1)[key[0] if batch > 1 else 0]
                    prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
                    exclude = bool(scalar(inputs, "exclude_input_in_output", key[0], False))
                    texts, done = _cut(texts, words, 0 if exclude else len(prompt))
                else:
                    done = False
                out["text_output"] = np.array([t.encode() for t in texts], dtype=object)
                if done:
                    stopped.add(key)
                    if len(stopped) == batch * _sequences(inputs):
                        chain.cancelled.set()  # every sequence stopped: stop generating
                        yield ModelResponse(out, final=False)
                        return
            yield ModelResponse(out, final=False)


class _StopState:
    """Streaming text stop words, matched as upstream's BLS matches them: a response's text extends the
    matched prefix of a stop word, any word it does not extend resets it; the text that completes a stop word
    is sent, everything after it is not."""

    def __init__(self):
        self.prefix, self.stopped = "", False

    def feed(self, text: str, words: list[str]) -> str:
        if self.stopped:
            return ""
        for word in words:
            if word.startswith(self.prefix + text):
                self.prefix += text
                if word == self.prefix:
                    self.stopped = True
                    break
            else:
                self.prefix = ""
        return text


def _cut(texts: list[str], words: list[str], start: int) -> tuple[list[str], bool]:
    """Each text cut after the first listed stop word found at or after `start` (upstream's order)."""
    out, done = [], False
    for text in texts:
        for word in words:
            i = text.find(word, start)
            if i != -1:
                text, done = text[: i + len(word)], True
                break
        out.append(text)
    return out, done


def _index(outputs: dict[str, np.ndarray], name: str) -> int:
    value = outputs.get(name)
    return int(value.reshape(-1)[0]) if value is not None and value.size == 1 else 0


def _sequences(inputs: dict[str, np.ndarray]) -> int:
    n = scalar(inputs, "num_return_sequences", 0, 1)
    if not isinstance(n, int) or n < 1:
        raise RequestError(f"num_return_sequences must be >= 1, got {n}")
    return n

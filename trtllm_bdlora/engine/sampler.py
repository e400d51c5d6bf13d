"""Next-token choice with TensorRT-LLM's semantics, as pure functions of the logits and the request.

Logit processing follows TensorRT-LLM's decoding layers (cpp/tensorrt_llm/kernels/penaltyKernels.cu
`batchApplyPenalty`, then banBadWords): embedding bias; temperature as a multiplication by 1/(T + 1e-6),
skipped at T = 1; for every token seen in the prompt or the output so far, repetition (divide a positive
logit, multiply a negative one), presence (subtract once) and frequency (subtract per occurrence)
penalties; the end ids masked while fewer than `min_tokens` tokens were generated; the last token of
each bad word masked when the tokens before it end the sequence.

Sampling (samplingTopKKernels.cu / samplingTopPKernels.cu): greedy at top_k 1; otherwise top-k (0 = all)
then top-p over the renormalised top-k probabilities, a token kept while the mass before it is below
top_p. Log probabilities are those of the chosen token, normalised over the kept tokens by default
(the backend's `normalize_log_probs`), else over the whole vocabulary. A guided request's grammar mask
(engine/guided.py) is applied after all of these, before the choice.
"""

from __future__ import annotations

import torch

from trtllm_bdlora.engine.request import Request
from trtllm_bdlora.errors import RequestError

MASKED = torch.finfo(torch.float64).min


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row of `x` (the last axis): every value finite. One sum per row, since a non-finite value makes its
    row's sum non-finite; the elementwise check (10-30x slower on a vocabulary-wide row) runs only where a sum is
    not finite, since finite values can overflow a sum."""
    ok = torch.isfinite(x.sum(-1))
    return ok if bool(ok.all()) else torch.isfinite(x).all(-1)


def ends_with(sequence: list[int], word: tuple[int, ...]) -> bool:
    return len(word) > 0 and len(sequence) >= len(word) and tuple(sequence[-len(word):]) == word


def adjust_logits(logits: torch.Tensor, req: Request, end_ids: frozenset[int]) -> torch.Tensor:
    """[vocab] float64 logits after bias, temperature, penalties, min-tokens and bad words."""
    x = logits.double().clone()
    vocab = x.shape[0]
    if req.params.embedding_bias is not None:
        x += req.params.embedding_bias.to(x)
    if req.params.temperature != 1.0:
        x *= 1.0 / (req.params.temperature + 1e-6)
    history = req.prompt_ids + req.output_ids
    if req.params.penalised:
        counts = torch.bincount(torch.tensor(history, dtype=torch.long), minlength=vocab)[:vocab].to(x)
        seen = (counts > 0).to(x)
        if req.params.repetition_penalty != 1.0:
            x = torch.where(seen > 0, torch.where(x < 0, x * req.params.repetition_penalty, x / req.params.repetition_penalty), x)
        x -= req.params.presence_penalty * seen
        x -= req.params.frequency_penalty * counts
    if len(req.output_ids) < req.params.min_tokens:
        for end in end_ids:
            if 0 <= end < vocab:
                x[end] = MASKED
    for word in req.params.bad_words:
        if len(word) == 1 or ends_with(history, word[:-1]):
            if 0 <= word[-1] < vocab:
                x[word[-1]] = MASKED
    return x


def kept_probabilities(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of `x` restricted to the top-k / top-p set, renormalised."""
    probs = torch.softmax(x, dim=-1)
    if 0 < top_k < probs.shape[0]:
        cut = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= cut, probs, torch.zeros_like(probs))
        probs /= probs.sum()
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs /= probs.sum()
    return probs


def choose(x: torch.Tensor, req: Request, generator: torch.Generator | None) -> tuple[int, float]:
    """(token, its log probability) from adjusted logits."""
    if req.params.greedy:
        token = int(torch.argmax(x))
        if not req.params.return_log_probs:
            return token, 0.0
        logp = 0.0 if req.params.normalize_log_probs else float(torch.log_softmax(x, -1)[token])
        return token, logp
    top_k = req.params.top_k or 0
    probs = kept_probabilities(x, top_k, req.params.top_p)
    token = int(torch.multinomial(probs, 1, generator=generator))
    if not req.params.return_log_probs:
        return token, 0.0
    logp = float(torch.log(probs[token])) if req.params.normalize_log_probs else float(torch.log_softmax(x, -1)[token])
    return token, logp


def apply_guide(x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Adjusted logits with the tokens a grammar forbids masked (guided decoding, applied last); a one-line error
    when no token is left (the grammar and min_tokens or bad_words exclude each other)."""
    x = x.masked_fill(~allowed, MASKED)
    if not bool((x > MASKED).any()):
        raise RequestError("guided decoding: no token is allowed by both the grammar and min_tokens / bad_words")
    return x


def _plain_greedy(req: Request, allowed: torch.Tensor | None) -> bool:
    """Greedy with nothing that can change which logit is largest (a temperature cannot) and no log-prob to report:
    the choice is the argmax of the logits as they are."""
    p = req.params
    return (p.greedy and allowed is None and p.embedding_bias is None and not p.penalised and not p.bad_words
            and len(req.output_ids) >= p.min_tokens and not (p.return_log_probs and not p.normalize_log_probs))


def sample(logits: torch.Tensor, req: Request, generator: torch.Generator | None,
           end_ids: frozenset[int], allowed: torch.Tensor | None = None) -> tuple[int, float]:
    """(token, its log-prob as `return_log_probs` defines it); `allowed`: the grammar's mask, or None."""
    if _plain_greedy(req, allowed):  # the same token as below, without a float64 copy of the row
        return int(torch.argmax(logits)), 0.0
    x = adjust_logits(logits, req, end_ids)
    if allowed is not None:
        x = apply_guide(x, allowed)
    return choose(x, req, generator)

"""Log probabilities for OpenAI's `logprobs` / `top_logprobs` / `echo` and vLLM's `prompt_logprobs`, computed on rank 0
from the logits the scheduler already receives.

They are the model's own (vLLM's default `logprobs_mode="raw_logprobs"`): log-softmax of the raw logits of the adapter
that served the request, in float64, before temperature, penalties, top-k/top-p or a grammar mask change them, so they
score text the same whatever the sampling settings (what lm-eval's log-likelihood tasks need). Each position keeps only
the chosen token's log-prob and rank and the top `k` (id, log-prob) pairs, never a vocabulary row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs, OpenAI chat's top_logprobs limit


@dataclass(frozen=True)
class TokenLogprobs:
    """One position: the token that is there (sampled, or the prompt's next token), its log-prob and rank (1: the
    most likely), and the `k` most likely tokens with theirs, most likely first."""

    token: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


def position_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """Logits [n, vocab] (row i predicts tokens[i]) -> one TokenLogprobs per row, with the top `k`."""
    if not tokens:
        return []
    logp = torch.log_softmax(logits.double(), dim=-1)
    index = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
    chosen = logp.gather(1, index)
    ranks = (logp > chosen).sum(dim=1) + 1
    top_values, top_ids = torch.topk(logp, k, dim=-1) if k > 0 else (None, None)
    out = []
    for i, token in enumerate(tokens):
        top = tuple(zip(top_ids[i].tolist(), top_values[i].tolist())) if k > 0 else ()
        out.append(TokenLogprobs(token, float(chosen[i, 0]), int(ranks[i]), top))
    return out


def prompt_chunk_logprobs(chunk_logits: torch.Tensor, prompt_ids: list[int], start: int, k: int) -> list[TokenLogprobs]:
    """Log-probs of the prompt tokens a prefill chunk's logits predict: the chunk at positions [start, start + n) has
    rows predicting positions start + 1 .. start + n; those inside the prompt are kept (the first prompt token has no
    log-prob; the row after the prompt's last token predicts the first generated one)."""
    targets = prompt_ids[start + 1 : start + 1 + chunk_logits.shape[0]]
    return position_logprobs(chunk_logits[: len(targets)], targets, k)

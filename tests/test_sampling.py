"""Token choice and finish rules with TensorRT-LLM's semantics, against independent loop-by-loop float64
references; upstream's word-list and embedding-bias tensors; sampling values validated at the edge."""

import math

import numpy as np
import pytest
import torch

from tests.helpers import make_request
from trtllm_bdlora.engine.generate import parse_request
from trtllm_bdlora.engine.request import Request
from trtllm_bdlora.engine.sampler import MASKED, adjust_logits, choose, finite_rows, kept_probabilities, sample
from trtllm_bdlora.engine.scheduler import finish_reason
from trtllm_bdlora.errors import RequestError
from trtllm_bdlora.serving.repository.tokens import decode, embedding_bias, parse_word_list, word_list

V = 50


def _request(**kw) -> Request:
    return make_request(**{"index": 0, "id": 0, "adapter": None, "prompt_ids": [3, 7, 7, 11], "max_tokens": 8, **kw})


def _reference(logits, req, end_ids):
    """penaltyKernels.cu batchApplyPenalty + banBadWords, one token at a time."""
    x = [float(v) for v in logits]
    history = req.prompt_ids + req.output_ids
    for t in range(V):
        v = x[t]
        if req.params.embedding_bias is not None:
            v += float(req.params.embedding_bias[t])
        if req.params.temperature != 1.0:
            v *= 1.0 / (req.params.temperature + 1e-6)
        n = history.count(t)
        if n:
            v = v * req.params.repetition_penalty if v < 0 else v / req.params.repetition_penalty
            v -= req.params.presence_penalty
            v -= req.params.frequency_penalty * n
        x[t] = v
    if len(req.output_ids) < req.params.min_tokens:
        for e in end_ids:
            x[e] = -math.inf
    for word in req.params.bad_words:
        if len(word) == 1 or tuple(history[-(len(word) - 1):]) == word[:-1]:
            x[word[-1]] = -math.inf
    return x


def test_logit_processing_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(V, generator=gen) * 3
        req = _request(temperature=[0.7, 1.0, 1.3][trial % 3], repetition_penalty=[1.0, 1.4, 0.8][trial % 3],
                       presence_penalty=[0.0, 0.6, -0.3][(trial + 1) % 3], frequency_penalty=[0.0, 0.25][trial % 2],
                       min_tokens=trial % 4, bad_words=((5,), (7, 9), (1, 2, 4)),
                       embedding_bias=torch.randn(V, generator=gen).double() if trial % 2 else None)
        req.output_ids = [9, 7, 1, 2][: trial % 5]
        got = adjust_logits(logits, req, frozenset({4, 9}))
        want = _reference(logits.double(), req, frozenset({4, 9}))
        for t in range(V):
            if want[t] == -math.inf:
                assert got[t] == MASKED, (trial, t)
            else:
                assert math.isclose(float(got[t]), want[t], rel_tol=1e-12, abs_tol=1e-12), (trial, t)


def test_top_k_then_top_p_keep_sets():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64)
    x = probs.log()
    assert (kept_probabilities(x, 2, 1.0) > 0).tolist() == [False, True, False, True, False]
    # top-p keeps a token while the mass before it is below p: 0.4, 0.3 (0.4 < 0.65), 0.15 (0.7 >= 0.65: dropped)
    kept = kept_probabilities(x, 0, 0.65)
    assert (kept > 0).tolist() == [False, True, False, True, False]
    assert torch.allclose(kept[[1, 3]], torch.tensor([0.4, 0.3], dtype=torch.float64) / 0.7)
    # top-p applies to the renormalised top-k distribution: 0.4 / 0.85 >= 0.45 drops the 0.3 token
    assert (kept_probabilities(x, 3, 0.45) > 0).tolist() == [False, True, False, False, False]
    assert (kept_probabilities(x, 0, 0.45) > 0).tolist() == [False, True, False, True, False]


def test_greedy_rule_and_log_probs():
    x = torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)
    assert _request(temperature=0.0).params.greedy and _request(top_k=1).params.greedy and not _request(top_k=0).params.greedy
    token, logp = choose(x, _request(top_k=1, return_log_probs=True), None)
    assert token == 1 and logp == 0.0  # normalised over the one kept token
    token, logp = choose(x, _request(top_k=1, return_log_probs=True, normalize_log_probs=False), None)
    assert math.isclose(logp, float(torch.log_softmax(x, 0)[1]))
    gen = torch.Generator().manual_seed(3)
    token, logp = choose(x, _request(top_k=2, return_log_probs=True), gen)
    assert token in (1, 2) and math.isclose(logp, float(torch.log(torch.softmax(x[1:], 0)[token - 1])))


def test_finish_reasons():
    req = _request(stop_words=((11, 5), (6,)), max_tokens=3)
    ends = frozenset({2})
    req.output_ids = [5]
    assert finish_reason(req, 5, ends) == "stop_words"  # a stop word may start in the prompt, as upstream's
    req.output_ids = [8]
    assert finish_reason(req, 8, ends) is None
    req.output_ids = [8, 2]
    assert finish_reason(req, 2, ends) == "end_id"
    req.output_ids = [8, 9, 10]
    assert finish_reason(req, 10, ends) == "length"
    req.cancelled = True
    assert finish_reason(req, 10, ends) == "cancelled"


class WordTokenizer:
    """Each space-separated word is one token; ids are positions in a fixed vocabulary."""

    vocab = {w: i for i, w in enumerate(["<eos>", "the", "cat", "sat", "on", "mat", "a", "dog"])}

    def encode(self, text, add_special_tokens=True):
        return [self.vocab[w] for w in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        words = [w for w, i in sorted(self.vocab.items(), key=lambda kv: kv[1]) for t in ids if i == t]
        return " ".join(w for w in words if not (skip_special_tokens and w == "<eos>"))


def test_word_lists_and_embedding_bias_have_upstream_layout():
    tok = WordTokenizer()
    words = np.array([["the cat", "mat"], ["dog", ""]], dtype=object)
    lists = word_list(tok, words, 2)
    assert lists.dtype == np.int32 and lists.shape == (2, 2, 3)
    assert lists[0].tolist() == [[1, 2, 5], [2, 3, -1]] and lists[1].tolist() == [[7, 0, 0], [1, -1, -1]]
    assert parse_word_list(lists[0]) == ((1, 2), (5,)) and parse_word_list(lists[1]) == ((7,),)
    assert word_list(tok, None, 3).shape == (3, 2, 0) and parse_word_list(np.zeros((2, 0), np.int32)) == ()
    with pytest.raises(RequestError, match="offsets"):
        parse_word_list(np.array([[1, 2], [2, 1]], np.int32))
    bias = embedding_bias(tok, np.array([["cat dog", "cat"]], dtype=object), np.array([[0.5, 2.0]], np.float32), 1)
    assert bias.shape == (1, 8) and bias[0, 2] == 2.5 and bias[0, 7] == 0.5 and bias.sum() == 3.0
    text = decode(tok, np.array([[[1, 2, 0, 0]], [[3, 4, 5, 0]]], np.int32), np.array([[2], [3]], np.int32), True)
    assert text.tolist() == [b"the cat", b"sat on mat"]


@pytest.mark.parametrize("field,value,fragment", [
    ("temperature", float("nan"), "temperature must be finite"),
    ("temperature", float("inf"), "temperature must be finite"),
    ("top_p", float("nan"), "top_p must be finite"),
    ("seed", -1, "seed must be >= 0"),
    ("seed", 2**64, "seed must be <="),
])
def test_generate_rejects_non_finite_and_out_of_range_values(field, value, fragment):
    with pytest.raises(RequestError, match=fragment):
        parse_request(0, {"prompt_ids": [1, 2], "max_tokens": 2, field: value}, None, 100, 64, set())


def test_plain_greedy_takes_the_same_token_as_the_full_path():
    """`sample`'s shortcut (argmax of the logits as they are) against `choose` on the float64-adjusted logits, with
    temperatures, ties and float32 values one ulp apart; anything that can move the argmax takes the full path."""
    gen = torch.Generator().manual_seed(5)
    end_ids = frozenset({4, 9})
    for trial in range(60):
        logits = (torch.randn(V, generator=gen) * 4).float()
        if trial % 3 == 0:
            logits[[3, 17, 40]] = logits.max()  # a tie: the first index wins on both paths
        if trial % 3 == 1:
            top = int(torch.argmax(logits))
            logits[(top + 1) % V] = torch.nextafter(logits[top], torch.tensor(math.inf))
        req = _request(temperature=[0.0, 1e-7, 0.7][trial % 3], top_k=[None, 1, 1][trial % 3],
                       min_tokens=[0, 0, 0, 2][trial % 4], bad_words=((int(torch.argmax(logits)),),) if trial % 5 == 0
                       else (), repetition_penalty=1.3 if trial % 7 == 0 else 1.0)
        req.output_ids = [1] if trial % 2 else []
        want = choose(adjust_logits(logits, req, end_ids), req, None)
        assert sample(logits, req, None, end_ids) == want
        assert req.params.greedy


def test_finite_rows_is_exact_where_a_sum_overflows():
    big = torch.finfo(torch.float32).max
    x = torch.randn(6, 1000)
    x[1, 5] = math.inf
    x[2, 7] = -math.inf
    x[3, 9] = math.nan
    x[4, :2] = big  # finite values whose sum overflows
    x[5, [0, 1]] = torch.tensor([math.inf, -math.inf])  # a sum of nan
    assert finite_rows(x).tolist() == [True, False, False, False, True, False]
    assert finite_rows(x[0]).item() is True

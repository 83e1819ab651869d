"""N-gram draft proposals and which requests may speculate (no model)."""

from batching.request import Request
from batching.sampling_params import SamplingParams
from batching.speculative import can_speculate, propose_ngram


def test_proposes_what_followed_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose_ngram(tokens, 3) == [7, 8, 5], "the latest earlier occurrence of [1, 2, 3] wins"
    assert propose_ngram(tokens, 1) == [7]
    assert propose_ngram([4, 5, 6, 4, 5], 4) == [6, 4, 5], "falls back to shorter n-grams"
    assert propose_ngram([1, 2, 3, 4], 4) == [], "no repeated n-gram of at least two tokens"
    assert propose_ngram([5, 5], 3) == [], "too short"


def test_only_plain_greedy_requests_speculate():
    def request(**params) -> Request:
        return Request("r", [1, 2, 3], SamplingParams(**params))

    assert can_speculate(request(temperature=0.0))
    for params in ({"temperature": 0.7}, {"temperature": 0.0, "logprobs": 1}, {"temperature": 0.0, "stop": ("x",)}, {"temperature": 0.0, "presence_penalty": 0.5}, {"temperature": 0.0, "logit_bias": {5: 1.0}}, {"temperature": 0.0, "min_tokens": 2, "max_tokens": 8}):
        assert not can_speculate(request(**params)), params

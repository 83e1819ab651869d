"""N-gram prompt lookup: draft tokens for speculative decoding, no draft model.

When a request's last ``n`` tokens occurred earlier in its prompt or output,
the tokens that followed that occurrence are a good guess for what comes next
(summaries, edits, code and extraction repeat their input). The scheduler
sends the guesses with the request's next token; one forward pass then checks
them all, and the greedy tokens that agree are kept (``ModelRunner``), so the
output is token-for-token what plain greedy decoding gives, only sooner.

Only plain greedy requests speculate (no logprobs, penalties, logit bias,
grammar, stop strings or pending ``min_tokens``): for them, verifying a draft
is comparing it with the argmax.
"""

from batching.request import Request

NGRAM_MAX = 3
NGRAM_MIN = 2


def can_speculate(request: Request) -> bool:
    params = request.sampling_params
    return (
        params.is_greedy
        and params.logprobs is None
        and params.prompt_logprobs is None
        and params.guided is None
        and not params.has_penalties
        and not params.logit_bias
        and not params.stop
        and request.num_output_tokens >= params.min_tokens
    )


def propose_ngram(tokens: list[int], num_tokens: int) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the latest earlier occurrence
    of the longest suffix (``NGRAM_MAX`` down to ``NGRAM_MIN`` tokens)."""
    length = len(tokens)
    for n in range(min(NGRAM_MAX, length - 1), NGRAM_MIN - 1, -1):
        suffix = tokens[length - n :]
        first = suffix[0]
        for start in range(length - n - 1, -1, -1):
            if tokens[start] == first and tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + num_tokens]
    return []

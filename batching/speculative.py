"""Where speculative decoding's draft tokens come from: two proposers.

A draft is a guess at a greedy request's next tokens. The scheduler sends the
guesses with the request's next token; one forward pass then checks them all,
and the greedy tokens that agree are kept (``ModelRunner``), so the output is
token-for-token what plain greedy decoding gives, only sooner.

* ``NgramProposer`` (no model): when the request's last ``n`` tokens occurred
  earlier in its prompt or output, the tokens that followed that occurrence
  (summaries, edits, code and extraction repeat their input). Pure Python, at
  schedule time.
* ``DraftModelProposer`` (``--speculative-model``): a smaller model with the
  same vocabulary runs in the runner after each step and proposes the next
  ``k`` tokens greedily; they come back in ``SampledToken.next_draft_token_ids``
  and wait on ``Request.draft_token_ids`` for the next step. The scheduler asks
  for them through the chunk's ``SpeculationPlan`` (``num_lookahead_tokens``,
  with blocks for the positions the draft model writes).

Only plain greedy requests speculate (no logprobs, penalties, logit bias,
grammar, stop strings or pending ``min_tokens``): for them, verifying a draft
is comparing it with the argmax.
"""

from typing import Protocol

from batching.request import Request

NGRAM_MAX = 3
NGRAM_MIN = 2
SOURCE_SEPARATOR = -1  # no token: no n-gram spans a source and its decoder tokens


def can_speculate(request: Request) -> bool:
    params = request.sampling_params
    return (
        params.is_greedy
        and params.logprobs is None
        and params.prompt_logprobs is None
        and params.guided is None
        and params.thinking is None
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


class Proposer(Protocol):
    """Draft tokens for a decoding request, and how many the runner should
    propose after a step (draft models only)."""

    def propose(self, request: Request, num_tokens: int) -> list[int]: ...

    def num_lookahead(self, request: Request, num_tokens: int) -> int: ...


class NgramProposer:
    """For an encoder-decoder request the lookup also reads its source
    (translation and summaries copy from it), after the decoder's own tokens."""

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        tokens = request.token_slice(0, request.num_tokens)
        if request.encoder_token_ids is not None:
            tokens = request.encoder_token_ids + [SOURCE_SEPARATOR] + tokens
            draft = propose_ngram(tokens, num_tokens)
            return draft[: draft.index(SOURCE_SEPARATOR)] if SOURCE_SEPARATOR in draft else draft
        return propose_ngram(tokens, num_tokens)

    def num_lookahead(self, request: Request, num_tokens: int) -> int:
        return 0


class DraftModelProposer:
    """Hands out what the runner's draft model proposed after the last step."""

    def propose(self, request: Request, num_tokens: int) -> list[int]:
        return request.draft_token_ids[:num_tokens]

    def num_lookahead(self, request: Request, num_tokens: int) -> int:
        return num_tokens if can_speculate(request) else 0

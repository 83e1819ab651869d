"""Draft proposals (n-gram lookup, a draft model's round trip through the
scheduler) and which requests may speculate (no model)."""

from batching.block_manager import BlockManager
from batching.messages import RunnerOutput, SampledToken
from batching.request import Request
from batching.sampling_params import SamplingParams
from batching.scheduler import Scheduler
from batching.scheduler_config import SchedulerConfig
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
    for params in (
        {"temperature": 0.7},
        {"temperature": 0.0, "logprobs": 1},
        {"temperature": 0.0, "stop": ("x",)},
        {"temperature": 0.0, "presence_penalty": 0.5},
        {"temperature": 0.0, "logit_bias": {5: 1.0}},
        {"temperature": 0.0, "min_tokens": 2, "max_tokens": 8},
    ):
        assert not can_speculate(request(**params)), params


def test_draft_model_mode_asks_for_lookahead_and_sends_the_proposals_back():
    """With a draft model the scheduler asks the runner for the next step's
    drafts (blocks included) and schedules what came back after the new token."""
    block_manager = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, num_speculative_tokens=3, speculative_method="draft_model"),
        block_manager,
    )
    request = Request("r", [5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=6))
    scheduler.add_request(request)

    prefill = scheduler.schedule()
    (chunk,) = prefill.chunks
    assert chunk.num_lookahead_tokens == 3 and chunk.draft_token_ids == []
    assert len(request.block_ids) * 4 >= 5 + 3, "blocks cover the positions the draft model writes"
    scheduler.update_from_output(prefill, RunnerOutput([SampledToken("r", 40, next_draft_token_ids=[41, 42, 43])]))

    decode = scheduler.schedule()
    (chunk,) = decode.chunks
    assert chunk.new_token_ids == [40, 41, 42, 43] and chunk.draft_token_ids == [41, 42, 43]
    assert chunk.num_lookahead_tokens == 1, "max_tokens 6: after 1 + 3 more tokens at most one is left to propose"
    # The model agreed with the first draft only: 40, 41, then its own 50.
    scheduler.update_from_output(decode, RunnerOutput([SampledToken("r", 50, accepted_draft_ids=[41], next_draft_token_ids=[51])]))
    assert request.output_token_ids == [40, 41, 50] and request.num_computed_tokens == 7
    assert request.draft_token_ids == [51]
    assert scheduler.num_draft_tokens == 3 and scheduler.num_accepted_tokens == 1


def test_ngram_mode_never_asks_for_lookahead():
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, num_speculative_tokens=3), BlockManager(num_blocks=16, block_size=4)
    )
    scheduler.add_request(Request("r", [1, 2, 3, 1, 2], SamplingParams(temperature=0.0, max_tokens=6)))
    (chunk,) = scheduler.schedule().chunks
    assert chunk.num_lookahead_tokens == 0

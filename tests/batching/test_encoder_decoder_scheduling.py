"""Scheduling encoder-decoder requests, without weights: the source counts
against the step budget whole, cross blocks come from the same pool and go
back on finish, abort and preemption, and decoder blocks are keyed by their
source too."""

from batching.request import Request, RequestStatus
from batching.sampling_params import SamplingParams
from tests.batching.factories import (
    BLOCK_SIZE,
    EOS_TOKEN_ID,
    FakeRunner,
    abort_request,
    assert_no_leak,
    create_scheduler,
    run_step,
    run_to_completion,
)

DECODER_START = 0


def seq2seq_request(request_id: str, num_source_tokens: int, max_tokens: int = 8, salt: int = 0) -> Request:
    source = [1000 * (salt + 1) + j for j in range(num_source_tokens)]
    return Request(request_id, [DECODER_START], SamplingParams(max_tokens=max_tokens), eos_token_id=EOS_TOKEN_ID, encoder_token_ids=source)


def test_cross_blocks_are_taken_at_admission_and_sent_once():
    scheduler, runner = create_scheduler(num_blocks=64), FakeRunner()
    request = seq2seq_request("a", 40)
    scheduler.add_request(request)
    output, _ = run_step(scheduler, runner)
    assert len(request.cross_block_ids) == 3  # 40 tokens in blocks of 16
    assert not set(request.cross_block_ids) & set(request.block_ids)
    chunk = output.chunks[0]
    assert chunk.new_request.encoder_token_ids == request.encoder_token_ids
    assert chunk.new_request.cross_block_ids == request.cross_block_ids
    assert output.num_batched_tokens == 41  # the source and the decoder's start token
    assert scheduler.block_manager.num_used_blocks == 4
    output, _ = run_step(scheduler, runner)
    assert output.chunks[0].new_request is None
    assert runner.requests["a"].cross_block_ids == request.cross_block_ids
    run_to_completion(scheduler, runner)
    assert_no_leak(scheduler)


def test_sources_share_a_step_within_the_budget():
    scheduler, runner = create_scheduler(max_num_batched_tokens=100), FakeRunner()
    for index, length in enumerate((30, 30, 30, 30)):
        scheduler.add_request(seq2seq_request(f"r{index}", length, salt=index))
    output, _ = run_step(scheduler, runner)
    assert [chunk.request_id for chunk in output.chunks] == ["r0", "r1", "r2"]  # 3 x (30 + 1) fit 100, a fourth does not
    output, _ = run_step(scheduler, runner)
    assert "r3" in [chunk.request_id for chunk in output.chunks]


def test_a_source_longer_than_the_budget_is_the_steps_first_admission_beside_the_decodes():
    """The same schedule as a decoder-only model's: running requests first,
    then the admission, which may overrun the budget by its source."""
    scheduler, runner = create_scheduler(max_num_batched_tokens=32), FakeRunner()
    scheduler.add_request(seq2seq_request("short", 5, max_tokens=20))
    run_step(scheduler, runner)
    scheduler.add_request(seq2seq_request("long", 100, salt=1))
    output, _ = run_step(scheduler, runner)
    assert [chunk.request_id for chunk in output.chunks] == ["short", "long"]
    assert output.num_batched_tokens == 1 + 100 + 1  # the decode, the source, the decoder's start token
    output, _ = run_step(scheduler, runner)
    assert sorted(chunk.request_id for chunk in output.chunks) == ["long", "short"]
    run_to_completion(scheduler, runner)
    assert_no_leak(scheduler)


def test_a_source_that_fits_the_budget_but_not_what_decoding_leaves_is_not_starved():
    """A step's first admission may overrun the budget by its source."""
    scheduler, runner = create_scheduler(max_num_batched_tokens=32), FakeRunner()
    for index in range(8):
        scheduler.add_request(seq2seq_request(f"d{index}", 1, max_tokens=30, salt=index))
    run_step(scheduler, runner)
    scheduler.add_request(seq2seq_request("mid", 28, salt=9))
    output, _ = run_step(scheduler, runner)
    assert "mid" in [chunk.request_id for chunk in output.chunks]
    assert output.num_batched_tokens == 8 + 28 + 1


def test_abort_and_preemption_free_cross_blocks():
    scheduler, runner = create_scheduler(num_blocks=12, max_num_batched_tokens=512), FakeRunner()
    first, second = seq2seq_request("first", 60, max_tokens=40), seq2seq_request("second", 60, max_tokens=40, salt=1)
    scheduler.add_request(first)
    scheduler.add_request(second)
    run_step(scheduler, runner)
    assert scheduler.block_manager.num_used_blocks == 10  # 4 cross + 1 decoder block each
    for _ in range(40):
        run_step(scheduler, runner)
        if scheduler.num_preemptions:
            break
    assert scheduler.num_preemptions == 1
    assert second.status == RequestStatus.PREEMPTED and second.cross_block_ids == [] and second.block_ids == []
    abort_request(scheduler, "second")
    run_to_completion(scheduler, runner)
    assert_no_leak(scheduler)


def test_a_request_too_large_for_the_pool_counts_its_cross_blocks():
    scheduler = create_scheduler(num_blocks=8)
    import pytest

    from batching.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="a source of 120 tokens"):
        scheduler.add_request(seq2seq_request("big", 120, max_tokens=8))  # 8 cross blocks + 1


def test_decoder_prefix_keys_depend_on_the_source():
    """Two requests with the same decoder tokens but different sources never share decoder blocks."""
    scheduler, runner = create_scheduler(num_blocks=64), FakeRunner()
    a, b = seq2seq_request("a", 10, max_tokens=40), seq2seq_request("b", 10, max_tokens=40, salt=1)
    scheduler.add_request(a)
    for _ in range(20):
        run_step(scheduler, runner)
    scheduler.add_request(b)
    b.output_token_ids = list(a.output_token_ids)  # the same decoder tokens so far
    assert scheduler.block_manager.find_cached_prefix(b) == ([], 0)
    c = seq2seq_request("c", 10, max_tokens=40)  # a's source
    c.output_token_ids = list(a.output_token_ids)
    assert scheduler.block_manager.find_cached_prefix(c)[1] == BLOCK_SIZE


def test_ngram_drafts_are_drawn_from_the_source_too():
    """Translation and summaries copy from the source: its n-grams propose drafts, never across its end."""
    from batching.speculative import NgramProposer

    request = Request("s", [DECODER_START], SamplingParams(max_tokens=8, temperature=0.0), encoder_token_ids=[10, 11, 12, 13, 14, 15])
    request.output_token_ids = [11, 12]
    assert NgramProposer().propose(request, 3) == [13, 14, 15]
    request.output_token_ids = [14, 15]
    assert NgramProposer().propose(request, 3) == []  # the source ends there
    request.output_token_ids = [14, 15, 30, 14, 15]
    assert NgramProposer().propose(request, 3) == [30, 14, 15]  # the decoder's own tokens come first

"""Scheduler policy without weights: hand-written runner outputs are fed to
``update_from_output`` (see ``tests.batching.factories``), so budget, chunked
prefill, FCFS admission, preemption, aborts and prefix hits are checked on
plain data, and a hypothesis run checks the block invariants after every
operation of random add / step / abort sequences on a pool small enough to
force preemption."""

import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from batching.errors import InvalidRequestError
from batching.messages import RunnerOutput, SampledToken, SchedulerOutput
from batching.request import Request, RequestStatus
from batching.scheduler import Scheduler
from batching.scheduler_config import CPU_TOKEN_BUDGET, CPU_TOKENS_PER_RUNNING_REQUEST, CUDA_TOKEN_BUDGET, SchedulerConfig
from tests.batching.factories import (
    EOS_TOKEN_ID,
    FIRST_SAMPLED_TOKEN_ID,
    Driver,
    FakeRunner,
    abort_request,
    assert_no_leak,
    create_request,
    create_requests,
    create_scheduler,
    ref_count,
    run_step,
    run_to_completion,
)


def add_all(scheduler: Scheduler, requests: list[Request]) -> None:
    for request in requests:
        scheduler.add_request(request)


def chunk_sizes(scheduler_output: SchedulerOutput) -> dict[str, int]:
    return {chunk.request_id: chunk.num_new_tokens for chunk in scheduler_output.chunks}


# --- admission checks -------------------------------------------------------------


@pytest.mark.parametrize(("max_tokens", "fits"), [(6, True), (7, False), (100, False)])
def test_add_request_rejects_a_request_larger_than_the_whole_cache(max_tokens: int, fits: bool) -> None:
    scheduler = create_scheduler(num_blocks=4, block_size=4)  # 16 slots
    request = create_request("big", list(range(10, 20)), max_tokens=max_tokens)
    if fits:
        scheduler.add_request(request)
        assert list(scheduler.waiting) == [request]
        return
    with pytest.raises(InvalidRequestError) as excinfo:
        scheduler.add_request(request)
    assert excinfo.value.param == "max_tokens"
    assert not scheduler.has_unfinished
    assert "big" not in scheduler.requests


def test_duplicate_request_id_is_rejected() -> None:
    scheduler = create_scheduler()
    scheduler.add_request(create_request("same", [1, 2, 3]))
    with pytest.raises(InvalidRequestError):
        scheduler.add_request(create_request("same", [4, 5, 6]))
    assert len(scheduler.waiting) == 1


# --- budget, ordering, chunking -----------------------------------------------------


def test_budget_and_max_num_seqs_are_never_exceeded() -> None:
    scheduler = create_scheduler(max_num_seqs=3, max_num_batched_tokens=32)
    requests = create_requests(7, num_tokens=20, max_tokens=5)
    add_all(scheduler, requests)
    runner = FakeRunner()
    while scheduler.has_unfinished:
        assert runner.num_steps < 200
        scheduler_output = scheduler.schedule()
        assert sum(chunk_sizes(scheduler_output).values()) == scheduler_output.num_batched_tokens
        assert scheduler_output.num_batched_tokens <= 32
        assert len(scheduler.running) <= 3
        assert len(scheduler_output.chunks) <= 3
        scheduler.update_from_output(scheduler_output, runner.step(scheduler_output))
    for request in requests:
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert request.status.finish_reason == "length"
        assert request.stop_reason is None
        assert request.num_output_tokens == 5
        assert request.block_ids == []
    assert_no_leak(scheduler)


def test_running_requests_decode_before_new_prefills() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=16)
    first, second = create_requests(2, num_tokens=4)
    add_all(scheduler, [first, second])
    run_step(scheduler, FakeRunner())  # both prefilled, both sampled once
    late = create_request("late", list(range(500, 540)))
    scheduler.add_request(late)

    scheduler_output = scheduler.schedule()
    assert [(c.request_id, c.num_new_tokens) for c in scheduler_output.chunks] == [
        ("req-0", 1),
        ("req-1", 1),
        ("late", 14),
    ]
    assert [c.is_sampling for c in scheduler_output.chunks] == [True, True, False]


def test_decodes_that_use_the_whole_budget_keep_new_requests_waiting() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=2)
    first, second = create_requests(2, num_tokens=1)
    add_all(scheduler, [first, second])
    runner = FakeRunner()
    run_step(scheduler, runner)
    late = create_request("late", [7, 8, 9])
    scheduler.add_request(late)
    scheduler_output, _ = run_step(scheduler, runner)
    assert chunk_sizes(scheduler_output) == {"req-0": 1, "req-1": 1}
    assert list(scheduler.waiting) == [late]
    assert late.status == RequestStatus.WAITING


def test_a_long_prompt_is_chunked_while_others_keep_decoding() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=8)
    (decoder,) = create_requests(1, num_tokens=4, max_tokens=10)
    scheduler.add_request(decoder)
    runner = FakeRunner()
    run_step(scheduler, runner)
    long_prompt = list(range(500, 530))
    scheduler.add_request(create_request("long", long_prompt, max_tokens=2))

    long_chunks = []
    for _ in range(5):
        scheduler_output, updates = run_step(scheduler, runner)
        assert scheduler_output.num_batched_tokens <= 8
        decode_chunk, long_chunk = scheduler_output.chunks
        assert (decode_chunk.request_id, decode_chunk.num_new_tokens) == ("req-0", 1)
        assert decode_chunk.is_sampling
        long_chunks.append(long_chunk)
        assert [u.request.request_id for u in updates][0] == "req-0"

    assert [c.num_new_tokens for c in long_chunks] == [7, 7, 7, 7, 2]
    assert [c.num_computed_tokens for c in long_chunks] == [0, 7, 14, 21, 28]
    assert [c.is_sampling for c in long_chunks] == [False] * 4 + [True]
    assert [t for c in long_chunks for t in c.new_token_ids] == long_prompt
    # The decoder gained one token per step, the long prompt one token at its end.
    assert decoder.num_output_tokens == 6
    assert scheduler.requests["long"].output_token_ids == [FIRST_SAMPLED_TOKEN_ID + 5]
    run_to_completion(scheduler, runner)
    assert_no_leak(scheduler)


def test_admission_is_first_come_first_served() -> None:
    scheduler = create_scheduler(max_num_seqs=1)
    requests = create_requests(4, num_tokens=5, max_tokens=3)
    add_all(scheduler, requests)
    runner = FakeRunner()
    admitted: list[str] = []
    while scheduler.has_unfinished:
        scheduler_output, _ = run_step(scheduler, runner)
        for chunk in scheduler_output.chunks:
            if chunk.request_id not in admitted:
                admitted.append(chunk.request_id)
    assert admitted == ["req-0", "req-1", "req-2", "req-3"]
    assert_no_leak(scheduler)


def test_all_admitted_in_arrival_order_when_they_fit() -> None:
    scheduler = create_scheduler()
    requests = create_requests(5, num_tokens=7)
    add_all(scheduler, requests)
    scheduler_output = scheduler.schedule()
    assert [c.request_id for c in scheduler_output.chunks] == [r.request_id for r in requests]
    assert scheduler.running == requests


def test_a_short_request_does_not_jump_a_head_that_lacks_blocks() -> None:
    scheduler = create_scheduler(num_blocks=4, block_size=4)
    runner = FakeRunner()
    holder = create_request("holder", list(range(10, 16)), max_tokens=3)  # 2 blocks
    scheduler.add_request(holder)
    run_step(scheduler, runner)
    head = create_request("head", list(range(20, 32)), max_tokens=4)  # needs 3 blocks
    small = create_request("small", [40, 41], max_tokens=2)  # would fit in 1
    add_all(scheduler, [head, small])

    scheduler_output, _ = run_step(scheduler, runner)
    assert chunk_sizes(scheduler_output) == {"holder": 1}
    assert list(scheduler.waiting) == [head, small]

    run_to_completion(scheduler, runner)
    assert head.num_output_tokens == 4 and small.num_output_tokens == 2
    assert_no_leak(scheduler)


# --- preemption -------------------------------------------------------------------


def test_preemption_evicts_the_most_recently_admitted_request() -> None:
    scheduler = create_scheduler(num_blocks=6, block_size=4)
    oldest = create_request("oldest", list(range(10, 18)))  # 2 full blocks
    middle = create_request("middle", list(range(20, 26)))
    newest = create_request("newest", list(range(30, 36)))
    add_all(scheduler, [oldest, middle, newest])
    runner = FakeRunner()
    run_step(scheduler, runner)  # all six blocks in use
    assert scheduler.block_manager.num_free_blocks == 0

    # The oldest needs a third block: the newest goes, the middle one stays.
    scheduler_output, _ = run_step(scheduler, runner)
    assert scheduler_output.preempted_request_ids == ["newest"]
    assert chunk_sizes(scheduler_output) == {"oldest": 1, "middle": 1}
    assert scheduler.running == [oldest, middle]
    assert newest.status == RequestStatus.PREEMPTED
    assert (newest.block_ids, newest.num_computed_tokens, newest.num_preemptions) == ([], 0, 1)
    assert scheduler.num_preemptions == 1


def test_a_request_preempts_itself_when_it_is_the_newest() -> None:
    scheduler = create_scheduler(num_blocks=4, block_size=4)
    older = create_request("older", list(range(10, 16)), max_tokens=4)
    newer = create_request("newer", list(range(20, 28)), max_tokens=4)  # 2 full blocks
    add_all(scheduler, [older, newer])
    runner = FakeRunner()
    run_step(scheduler, runner)
    scheduler_output, _ = run_step(scheduler, runner)
    assert scheduler_output.preempted_request_ids == ["newer"]
    assert chunk_sizes(scheduler_output) == {"older": 1}
    assert list(scheduler.waiting) == [newer]


class PreemptTheAsker:
    """A policy that gives up the blocks of whoever asks for more."""

    def choose_victim(self, candidates: list) -> object:
        return candidates[0]


class LastComeFirstServed:
    def next_to_admit(self, waiting):
        return waiting[-1]

    def requeue_preempted(self, waiting, request) -> None:
        waiting.append(request)


def test_the_preemption_policy_is_swappable() -> None:
    """The same pool pressure as above; another policy picks another victim,
    and only among requests not yet scheduled in the step."""
    scheduler = create_scheduler(num_blocks=6, block_size=4)
    scheduler.preemption = PreemptTheAsker()
    oldest = create_request("oldest", list(range(10, 18)))
    middle = create_request("middle", list(range(20, 26)))
    newest = create_request("newest", list(range(30, 36)))
    add_all(scheduler, [oldest, middle, newest])
    runner = FakeRunner()
    run_step(scheduler, runner)
    scheduler_output, _ = run_step(scheduler, runner)
    assert scheduler_output.preempted_request_ids == ["oldest"]
    assert chunk_sizes(scheduler_output) == {"middle": 1, "newest": 1}
    assert oldest.status == RequestStatus.PREEMPTED and scheduler.running == [middle, newest]


def test_the_admission_policy_is_swappable() -> None:
    scheduler = create_scheduler(max_num_seqs=1)
    scheduler.admission = LastComeFirstServed()
    first, second = create_request("first", [10, 11]), create_request("second", [20, 21])
    add_all(scheduler, [first, second])
    scheduler_output, _ = run_step(scheduler, FakeRunner())
    assert chunk_sizes(scheduler_output) == {"second": 2}


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_preempted_request_goes_to_the_front_recomputes_and_continues(enable_prefix_caching: bool) -> None:
    scheduler = create_scheduler(num_blocks=4, block_size=4, max_num_seqs=2, enable_prefix_caching=enable_prefix_caching)
    first = create_request("first", list(range(10, 16)), max_tokens=8)
    second = create_request("second", list(range(20, 26)), max_tokens=8)
    queued = create_request("queued", [40, 41, 42], max_tokens=2)
    add_all(scheduler, [first, second, queued])
    runner = FakeRunner()
    for _ in range(3):  # prefill, then two decodes: 9 tokens each, 8 computed
        scheduler_output, _ = run_step(scheduler, runner)
        assert not scheduler_output.preempted_request_ids

    scheduler_output, _ = run_step(scheduler, runner)
    assert scheduler_output.preempted_request_ids == ["second"]
    assert list(scheduler.waiting) == [second, queued]
    outputs_before = list(second.output_token_ids)
    assert outputs_before == [100, 101, 102]

    # It waits (no token, no gap) until it is readmitted, ahead of ``queued``.
    readmission = None
    while readmission is None:
        scheduler_output, _ = run_step(scheduler, runner)
        sizes = chunk_sizes(scheduler_output)
        assert "queued" not in sizes or "second" in sizes
        readmission = next((c for c in scheduler_output.chunks if c.request_id == "second"), None)
    assert first.status == RequestStatus.FINISHED_LENGTH
    # ``first`` grew into the blocks ``second`` left, so nothing of it stayed cached.
    assert readmission.num_computed_tokens == 0
    assert readmission.new_token_ids == second.prompt_token_ids + outputs_before
    assert readmission.is_sampling
    assert second.output_token_ids[: len(outputs_before)] == outputs_before

    run_to_completion(scheduler, runner)
    assert second.num_output_tokens == 8
    assert second.output_token_ids == sorted(set(second.output_token_ids))
    assert queued.num_output_tokens == 2
    assert_no_leak(scheduler)


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_a_readmitted_request_reuses_its_own_cached_blocks(enable_prefix_caching: bool) -> None:
    scheduler = create_scheduler(num_blocks=5, block_size=4, enable_prefix_caching=enable_prefix_caching)
    first = create_request("first", list(range(10, 18)), max_tokens=2)  # 2 full blocks
    second = create_request("second", list(range(20, 30)), max_tokens=3)  # 2 full + 1 partial
    add_all(scheduler, [first, second])
    runner = FakeRunner()
    run_step(scheduler, runner)  # the whole pool in use

    # ``first`` takes a third block: ``second`` goes, its partial tail block is
    # evicted first, and ``first`` finishes in this step.
    scheduler_output, _ = run_step(scheduler, runner)
    assert scheduler_output.preempted_request_ids == ["second"]
    assert first.status == RequestStatus.FINISHED_LENGTH

    scheduler_output, _ = run_step(scheduler, runner)
    (readmission,) = scheduler_output.chunks
    expected_hit = 8 if enable_prefix_caching else 0
    assert second.num_cached_tokens == expected_hit
    assert scheduler.num_prefix_hit_tokens == expected_hit
    assert readmission.num_computed_tokens == expected_hit
    assert readmission.new_token_ids == (second.prompt_token_ids + [100])[expected_hit:]
    assert readmission.is_sampling
    assert second.output_token_ids == [100, 102]

    run_to_completion(scheduler, runner)
    assert second.output_token_ids == [100, 102, 103]
    assert_no_leak(scheduler)


# --- finish and abort ---------------------------------------------------------------


def test_abort_a_running_request_frees_its_blocks() -> None:
    scheduler = create_scheduler()
    kept, aborted = create_requests(2, num_tokens=40)
    add_all(scheduler, [kept, aborted])
    runner = FakeRunner()
    run_step(scheduler, runner)
    assert scheduler.block_manager.num_used_blocks == 6

    returned = abort_request(scheduler, "req-1")
    assert returned is aborted
    assert aborted.status == RequestStatus.FINISHED_ABORTED
    assert aborted.status.finish_reason == "abort"
    assert aborted.block_ids == []
    assert scheduler.running == [kept]
    assert scheduler.block_manager.num_used_blocks == 3
    assert abort_request(scheduler, "req-1") is None
    assert abort_request(scheduler, "never-added") is None

    run_to_completion(scheduler, runner)
    assert kept.num_output_tokens == 16
    assert_no_leak(scheduler)


def test_abort_waiting_and_preempted_requests() -> None:
    scheduler = create_scheduler(num_blocks=4, block_size=4, max_num_seqs=2)
    first = create_request("first", list(range(10, 18)), max_tokens=4)
    second = create_request("second", list(range(20, 26)), max_tokens=4)
    queued = create_request("queued", [40, 41], max_tokens=4)
    add_all(scheduler, [first, second, queued])
    runner = FakeRunner()
    run_step(scheduler, runner)
    scheduler_output, _ = run_step(scheduler, runner)
    assert scheduler_output.preempted_request_ids == ["second"]

    for request in (second, queued):
        assert abort_request(scheduler, request.request_id) is request
        assert request.status == RequestStatus.FINISHED_ABORTED
        assert request not in scheduler.waiting
    assert not scheduler.waiting

    abort_request(scheduler, "first")
    assert not scheduler.has_unfinished
    assert_no_leak(scheduler)


def test_a_request_aborted_while_its_step_runs_gets_no_token() -> None:
    scheduler = create_scheduler()
    kept, aborted = create_requests(2, num_tokens=20, max_tokens=3)
    add_all(scheduler, [kept, aborted])
    runner = FakeRunner()
    scheduler_output = scheduler.schedule()
    abort_request(scheduler, "req-1")
    updates = scheduler.update_from_output(scheduler_output, runner.step(scheduler_output))
    assert [u.request for u in updates] == [kept]
    assert aborted.output_token_ids == []
    assert aborted.block_ids == []
    run_to_completion(scheduler, runner)
    assert_no_leak(scheduler)


def test_hand_written_eos_finishes_with_stop() -> None:
    scheduler = create_scheduler()
    (request,) = create_requests(1, num_tokens=5)
    scheduler.add_request(request)
    scheduler_output = scheduler.schedule()
    eos = RunnerOutput([SampledToken("req-0", EOS_TOKEN_ID)])
    updates = scheduler.update_from_output(scheduler_output, eos)
    assert [u.token_id for u in updates] == [EOS_TOKEN_ID]
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.status.finish_reason == "stop"
    assert not scheduler.has_unfinished
    assert_no_leak(scheduler)


# --- prefix hits --------------------------------------------------------------------

PREFIX = list(range(5000, 5048))  # three blocks of 16


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_prefix_hits_are_counted(enable_prefix_caching: bool) -> None:
    scheduler = create_scheduler(enable_prefix_caching=enable_prefix_caching)
    (first,) = create_requests(1, num_tokens=53, prefix=PREFIX)
    scheduler.add_request(first)
    runner = FakeRunner()
    run_step(scheduler, runner)
    (second,) = create_requests(1, num_tokens=53, prefix=PREFIX, first_index=1)
    scheduler.add_request(second)

    scheduler_output, _ = run_step(scheduler, runner)
    chunk = scheduler_output.chunks[-1]
    assert chunk.request_id == "req-1"
    expected_hit = 48 if enable_prefix_caching else 0
    assert scheduler.num_prefix_hit_tokens == expected_hit
    assert scheduler.num_prefix_query_tokens == 53 + 53
    assert second.num_cached_tokens == expected_hit
    assert chunk.num_computed_tokens == expected_hit
    assert chunk.new_token_ids == second.prompt_token_ids[expected_hit:]
    shared = set(first.block_ids) & set(second.block_ids)
    if enable_prefix_caching:
        assert second.block_ids[:3] == first.block_ids[:3] and len(shared) == 3
        assert all(ref_count(scheduler.block_manager, b) == 2 for b in shared)
    else:
        assert not shared
    run_to_completion(scheduler, runner)
    assert_no_leak(scheduler)


def test_identical_prompts_in_one_step_both_compute_and_a_later_one_hits() -> None:
    scheduler = create_scheduler()
    twins = [create_request(f"twin-{i}", [*PREFIX, 1], max_tokens=4) for i in range(2)]
    add_all(scheduler, twins)
    runner = FakeRunner()
    run_step(scheduler, runner)  # neither prompt was cached when the step was planned
    assert scheduler.num_prefix_hit_tokens == 0
    assert not set(twins[0].block_ids) & set(twins[1].block_ids)

    late = create_request("late", [*PREFIX, 1], max_tokens=2)
    scheduler.add_request(late)
    run_step(scheduler, runner)
    assert scheduler.num_prefix_hit_tokens == 48
    assert late.block_ids[:3] == twins[0].block_ids[:3]
    run_to_completion(scheduler, runner)
    assert_no_leak(scheduler)


# --- random operation sequences ------------------------------------------------------

PREFIXES = ((), tuple(range(300, 304)), tuple(range(400, 408)))


# Prompts from a three-token alphabet behind optional shared prefixes, so
# whole and partial prefix hits (and identical prompts) are common.
prompts = st.builds(
    lambda prefix, tail: [*prefix, *tail],
    st.sampled_from(PREFIXES),
    st.lists(st.integers(500, 502), min_size=1, max_size=8),
)
add_ops = st.tuples(st.just("add"), prompts, st.integers(1, 8))
abort_ops = st.tuples(st.sampled_from(["abort", "abort_in_flight"]), st.integers(0, 40))
step_ops = st.just(("step",))
# Steps and adds outweigh aborts, so pools fill up and preemption happens.
operations = st.lists(st.one_of(add_ops, add_ops, step_ops, step_ops, step_ops, abort_ops), min_size=10, max_size=60)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(4, 8),
    block_size=st.sampled_from([2, 4]),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 24),
    enable_prefix_caching=st.booleans(),
    sliding_window=st.one_of(st.none(), st.integers(1, 9)),
    ops=operations,
    drain=st.booleans(),
)
def test_random_operations_keep_block_invariants(
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    enable_prefix_caching: bool,
    sliding_window: int | None,
    ops: list[tuple],
    drain: bool,
) -> None:
    scheduler = create_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=enable_prefix_caching,
        sliding_window=sliding_window,
    )
    driver = Driver(scheduler)
    for operation in ops:
        driver.apply(operation)
        driver.check()

    if drain:
        # Liveness: everything still unfinished completes, preemptions included.
        for _ in range(3000):
            if not scheduler.has_unfinished:
                break
            driver.step()
            driver.check()
        assert not scheduler.has_unfinished
        for request in driver.requests:
            if request.status != RequestStatus.FINISHED_ABORTED:
                assert request.status == RequestStatus.FINISHED_LENGTH
                assert request.num_output_tokens == request.sampling_params.max_tokens
    else:
        for request in driver.requests:
            abort_request(scheduler, request.request_id)
        assert not scheduler.has_unfinished
    driver.check()
    assert_no_leak(scheduler)
    target(float(scheduler.num_preemptions), label="preemptions")


def test_the_block_a_finishing_request_fills_in_its_last_step_is_cached() -> None:
    """The last decode step computes the block's final slot; the request then
    finishes, and that full block must still be registered for reuse."""
    scheduler = create_scheduler(num_blocks=8, block_size=4)
    first = create_request("first", [10, 11, 12], max_tokens=2)
    add_all(scheduler, [first])
    runner = FakeRunner()
    run_to_completion(scheduler, runner)
    assert first.status == RequestStatus.FINISHED_LENGTH
    full_block = first.prompt_token_ids + first.output_token_ids[:1]  # positions 0-3, all computed
    follow_up = create_request("follow-up", full_block + [50, 51], max_tokens=1)
    add_all(scheduler, [follow_up])
    run_step(scheduler, runner)
    assert follow_up.num_cached_tokens == 4


def test_the_budget_grows_with_the_running_requests_when_asked():
    """tokens_per_running_request: 8 per running request, at least the base
    budget; the prompts queued behind 40 decodes get what is left."""
    scheduler = create_scheduler(num_blocks=512, max_num_batched_tokens=64, tokens_per_running_request=8)
    for request in create_requests(40, num_tokens=1, max_tokens=100):
        scheduler.add_request(request)
    runner = FakeRunner()
    first, _ = run_step(scheduler, runner)
    assert first.num_batched_tokens == 40, "40 one-token prompts fit the base budget of 64"
    for request in create_requests(4, num_tokens=200, max_tokens=4, first_index=100):
        scheduler.add_request(request)
    second, _ = run_step(scheduler, runner)
    assert second.num_batched_tokens == 8 * 40, "40 running: 320 tokens, of which 280 go to the new prompts"
    fixed = create_scheduler(num_blocks=512, max_num_batched_tokens=64)
    for request in create_requests(40, num_tokens=1, max_tokens=100) + create_requests(4, num_tokens=200, max_tokens=4, first_index=100):
        fixed.add_request(request)
    run_step(fixed, runner)
    assert run_step(fixed, runner)[0].num_batched_tokens == 64, "without it the budget stays fixed"


# --- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "device_type, given, expected",
    [
        ("cpu", None, (CPU_TOKEN_BUDGET, CPU_TOKENS_PER_RUNNING_REQUEST)),
        ("cuda", None, (CUDA_TOKEN_BUDGET, 0)),
        ("cpu", 300, (300, 0)),  # a budget given is fixed
        ("cuda", 300, (300, 0)),
    ],
)
def test_step_budget_is_resolved_by_device(device_type, given, expected) -> None:
    config = SchedulerConfig.for_device(device_type, max_num_seqs=8, max_num_batched_tokens=given, num_speculative_tokens=2)
    assert (config.max_num_batched_tokens, config.tokens_per_running_request) == expected
    assert (config.max_num_seqs, config.num_speculative_tokens) == (8, 2)


def test_max_step_tokens_is_the_budget_at_full_concurrency_with_drafts() -> None:
    growing = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=128, tokens_per_running_request=8, num_speculative_tokens=2)
    assert growing.max_step_tokens == 64 * 8 + 64 * 2
    fixed = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=300)
    assert fixed.max_step_tokens == 300

"""Where every layer slides (``BlockManager.sliding_window``), a running
request holds about a window's worth of blocks however long it runs: blocks
wholly before its next query's window go back to the pool, keyed, so the
prefix cache still finds them; admission counts the window, not the length."""

import pytest

from batching.errors import InvalidRequestError
from tests.batching.factories import BLOCK_SIZE, FakeRunner, assert_no_leak, check_invariants, create_request, create_scheduler, run_step


def test_a_request_longer_than_the_pool_runs_in_a_window_of_blocks():
    # 8 blocks of 16 = 128 tokens; the request reaches 300 + 100 = 400.
    scheduler = create_scheduler(num_blocks=8, max_num_batched_tokens=48, sliding_window=32)
    request = create_request("long", list(range(3, 303)), max_tokens=100)
    scheduler.add_request(request)
    bound = scheduler.block_manager.max_blocks_held(request.max_total_tokens, scheduler.config.max_step_tokens)
    assert bound == 6  # cdiv(31 + 48, 16) + 1
    runner = FakeRunner()
    most_held = 0
    while scheduler.has_unfinished:
        run_step(scheduler, runner)
        check_invariants(scheduler, [request])
        most_held = max(most_held, scheduler.block_manager.num_used_blocks)
        if not request.is_finished:
            # After each step: the window's blocks (31 tokens back from the next query) and its own.
            assert scheduler.block_manager.num_used_blocks <= -(-(31 + 1) // BLOCK_SIZE) + 1
    assert request.num_output_tokens == 100 and scheduler.num_preemptions == 0
    assert most_held <= bound
    assert_no_leak(scheduler)


def test_without_the_window_the_same_request_is_refused():
    scheduler = create_scheduler(num_blocks=8, max_num_batched_tokens=48)
    with pytest.raises(InvalidRequestError, match="the whole cache holds 128"):
        scheduler.add_request(create_request("long", list(range(3, 303)), max_tokens=100))
    sliding = create_scheduler(num_blocks=8, max_num_batched_tokens=48, sliding_window=100)  # 99 + 48 tokens: 11 blocks
    with pytest.raises(InvalidRequestError):
        sliding.add_request(create_request("long", list(range(3, 303)), max_tokens=100))


def test_dropped_blocks_stay_in_the_prefix_cache_and_a_hit_keeps_only_its_window():
    scheduler = create_scheduler(num_blocks=64, max_num_batched_tokens=256, sliding_window=16)
    prompt = list(range(3, 103))  # 100 tokens: 6 full blocks
    first = create_request("first", prompt, max_tokens=2)
    scheduler.add_request(first)
    runner = FakeRunner()
    run_step(scheduler, runner)  # the whole prompt in one step, then its blocks drop
    assert first.num_dropped_blocks == (100 - 16 + 1) // BLOCK_SIZE == 5
    assert scheduler.block_manager.num_used_blocks == 2  # blocks 5 and 6 of 0-6
    run_step(scheduler, runner)
    assert first.is_finished and scheduler.block_manager.num_used_blocks == 0
    second = create_request("second", prompt, max_tokens=4)
    scheduler.add_request(second)
    run_step(scheduler, runner)
    assert second.num_cached_tokens == 96  # every full block of the prompt, dropped ones included
    check_invariants(scheduler, [second])
    # Admitted at token 96 with a window of 16: blocks 0-4 dropped at once, 5-6 held.
    assert scheduler.block_manager.num_used_blocks == 2
    while scheduler.has_unfinished:
        run_step(scheduler, runner)
    assert_no_leak(scheduler)


def test_chunks_that_outrun_the_window_free_as_they_go_and_preemption_still_works():
    """Four long requests in a pool that holds their windows but not their
    lengths: they all finish, some preempted and recomputed."""
    scheduler = create_scheduler(num_blocks=8, max_num_batched_tokens=40, sliding_window=20)
    requests = [create_request(f"r{i}", [1000 * (i + 1) + j for j in range(90 + 7 * i)], max_tokens=30) for i in range(4)]
    for request in requests:
        scheduler.add_request(request)
    runner = FakeRunner()
    for _ in range(500):
        if not scheduler.has_unfinished:
            break
        run_step(scheduler, runner)
        check_invariants(scheduler, requests)
    assert all(request.num_output_tokens == 30 for request in requests)
    assert scheduler.num_preemptions > 0
    assert_no_leak(scheduler)

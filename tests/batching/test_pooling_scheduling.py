"""Pooling requests (embeddings) through the scheduler and the engine core,
without weights: admitted whole against the same token budget as prefills,
holding no blocks, finished after their one step with the runner's vector,
beside generating requests in the same steps."""

import pytest

from batching.batcher import DynamicBatcher
from batching.engine_core import EngineCore
from batching.errors import InvalidRequestError
from batching.messages import PooledOutput, RunnerOutput, SampledToken, SchedulerOutput
from batching.pooling_params import PoolingModel, PoolingParams
from batching.request import Request, RequestStatus
from batching.views import engine_view
from tests.batching.factories import FIRST_SAMPLED_TOKEN_ID, assert_no_leak, create_request, create_scheduler
from tests.fake_engine import CharTokenizer


class PoolingFakeRunner:
    """Answers each pooling chunk with ``[request's input length, first token]``
    and samples ``100`` for every sampling chunk; records what it was sent."""

    def __init__(self, pool: bool = True) -> None:
        self.pool = pool
        self.steps: list[SchedulerOutput] = []

    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.steps.append(scheduler_output)
        pooled = [
            PooledOutput(chunk.request_id, [float(chunk.num_new_tokens), float(chunk.new_token_ids[0])])
            for chunk in scheduler_output.chunks
            if chunk.new_request is not None and chunk.new_request.pooling is not None and self.pool
        ]
        sampled = [SampledToken(chunk.request_id, FIRST_SAMPLED_TOKEN_ID) for chunk in scheduler_output.chunks if chunk.is_sampling]
        return RunnerOutput(sampled=sampled, pooled=pooled)


def pooling_request(request_id: str, num_tokens: int, first_token: int = 40) -> Request:
    return Request(
        request_id, [first_token + i for i in range(num_tokens)], create_request("x", [1]).sampling_params, pooling=PoolingParams()
    )


def core_with(runner: PoolingFakeRunner, max_num_batched_tokens: int = 64, num_blocks: int = 16) -> EngineCore:
    scheduler = create_scheduler(num_blocks=num_blocks, max_num_batched_tokens=max_num_batched_tokens)
    return EngineCore(scheduler, runner, CharTokenizer(), max_model_len=100, pooling=PoolingModel("embed", 2))


def test_pooling_requests_run_whole_in_one_step_with_no_blocks_and_finish_with_their_vectors():
    runner = PoolingFakeRunner()
    core = core_with(runner)
    for index, length in enumerate((5, 30, 12)):
        core.add_request(pooling_request(f"e{index}", length, first_token=40 + index))
    outputs = core.step()
    (step,) = runner.steps
    assert [(chunk.request_id, chunk.num_new_tokens, chunk.is_sampling, chunk.new_block_ids) for chunk in step.chunks] == [
        ("e0", 5, False, []),
        ("e1", 30, False, []),
        ("e2", 12, False, []),
    ]
    assert step.num_batched_tokens == 47
    assert {output.request_id: output.pooled for output in outputs} == {"e0": [5.0, 40.0], "e1": [30.0, 41.0], "e2": [12.0, 42.0]}
    assert all(output.finish_reason == "stop" and output.new_token_ids == [] for output in outputs)
    assert [output.num_prompt_tokens for output in outputs] == [5, 30, 12]
    assert not core.has_unfinished and core.num_pooled_total == 3
    assert_no_leak(core.scheduler)


def test_an_input_past_the_budget_left_waits_for_the_next_step_unless_it_comes_first():
    runner = PoolingFakeRunner()
    core = core_with(runner, max_num_batched_tokens=32)
    core.add_request(pooling_request("e0", 20))
    core.add_request(pooling_request("e1", 20))  # 20 + 20 > 32: next step, never cut in two
    core.add_request(pooling_request("e2", 50))  # longer than a whole step: runs alone, first in its step
    order = []
    while core.has_unfinished:
        core.step()
        order.append([chunk.request_id for chunk in runner.steps[-1].chunks])
    assert order == [["e0"], ["e1"], ["e2"]]
    assert [chunk.num_new_tokens for step in runner.steps for chunk in step.chunks] == [20, 20, 50]
    assert not core.has_unfinished


def test_a_pooling_request_without_a_vector_ends_in_an_error_not_a_hang():
    core = core_with(PoolingFakeRunner(pool=False))
    core.add_request(pooling_request("e0", 4))
    (output,) = core.step()
    assert output.finish_reason == "error" and output.error and output.pooled is None
    assert not core.has_unfinished


def test_pooling_and_generating_requests_share_a_step_on_an_engine_that_serves_both_kinds():
    """The scheduler mixes them (a decoder embedder's runner may serve both);
    the generating request keeps its blocks, the pooling one takes none."""
    runner = PoolingFakeRunner()
    scheduler = create_scheduler(num_blocks=16)
    scheduler.add_request(create_request("g0", list(range(10, 20)), max_tokens=3))
    scheduler.add_request(pooling_request("e0", 8))
    step = scheduler.schedule()
    assert [(chunk.request_id, chunk.is_sampling) for chunk in step.chunks] == [("g0", True), ("e0", False)]
    runner_output = runner.step(step)
    pooled = scheduler.finish_pooled(step, runner_output)
    scheduler.update_from_output(step, runner_output)
    assert [(request.request_id, values) for request, values in pooled] == [("e0", [8.0, 40.0])]
    assert scheduler.requests["g0"].status == RequestStatus.RUNNING and len(scheduler.requests["g0"].block_ids) == 1
    assert scheduler.block_manager.num_used_blocks == 1


def test_a_pooling_model_refuses_generation_and_a_generating_one_refuses_pooling():
    pooling_core = core_with(PoolingFakeRunner())
    with pytest.raises(InvalidRequestError, match="pooling model"):
        pooling_core.make_request("g", [50, 51], create_request("x", [1]).sampling_params)
    with pytest.raises(InvalidRequestError, match="at most 100 tokens") as error:
        pooling_core.make_request("e", [50] * 101, PoolingParams())
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError, match="Matryoshka"):
        pooling_core.make_request("e", [50], PoolingParams(dimensions=1))
    generating_core = EngineCore(create_scheduler(), PoolingFakeRunner(), CharTokenizer())
    with pytest.raises(InvalidRequestError, match="does not serve embeddings"):
        generating_core.make_request("e", [50], PoolingParams())


def test_matryoshka_dimensions_are_checked_against_the_vectors_length():
    model = PoolingModel("embed", 8, is_matryoshka=True)
    model.check(PoolingParams(dimensions=4))
    with pytest.raises(InvalidRequestError, match="at most 8"):
        model.check(PoolingParams(dimensions=9))
    with pytest.raises(InvalidRequestError, match="at least 1"):
        PoolingParams(dimensions=0)


def test_the_live_view_shows_a_pooling_request_in_its_step_as_pooling():
    core = core_with(PoolingFakeRunner())
    core.add_request(pooling_request("e0", 6))
    core.schedule()  # admitted: running until the step's outputs finish it
    (row,) = engine_view(core, num_pending=0).requests
    assert (row.request_id, row.state, row.num_prompt_tokens, row.num_blocks) == ("e0", "pooling", 6, 0)


async def test_a_client_that_leaves_before_its_step_cancels_its_pooling_request():
    runner = PoolingFakeRunner()
    batcher = DynamicBatcher(core_with(runner))
    await batcher.start()
    try:
        await batcher.generate([40, 41, 42], PoolingParams(), "gone")
        batcher.abort("gone")  # what a route's merge does when its client leaves: before its step, it never runs
        stays = [output async for output in await batcher.generate([50, 51], PoolingParams(), "stays")]
        assert [output.pooled for output in stays] == [[2.0, 50.0]]
        assert [chunk.request_id for step in runner.steps for chunk in step.chunks] == ["stays"]
        assert not batcher.core.has_unfinished and batcher.num_requests == 0
    finally:
        await batcher.stop()

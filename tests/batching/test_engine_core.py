"""``EngineCore`` and ``DynamicBatcher`` without a model: every way a request
finishes, aborts within one step, and error isolation (a failed step ends
its own requests; the loop and the other requests go on)."""

import asyncio

import pytest

from batching.request import RequestStatus
from batching.sampling_params import SamplingParams
from tests.fake_engine import EOS_TOKEN_ID, REPLY, ScriptedRunner, fake_batcher, fake_core

PROMPT = [ord(char) for char in "Hi!"]


def run_alone(params: SamplingParams, runner: ScriptedRunner | None = None):
    """Step one request to its finish; return its deltas."""
    core = fake_core(runner)
    core.add_request(core.make_request("r", PROMPT, params))
    outputs = []
    while core.has_unfinished:
        outputs += core.step()
    assert core.scheduler.block_manager.num_used_blocks == 0
    return outputs


@pytest.mark.parametrize(
    "params, text, finish_reason, stop_reason",
    [
        (SamplingParams(max_tokens=5), REPLY[:5], "length", None),
        (SamplingParams(max_tokens=100), REPLY, "stop", None),  # EOS
        (SamplingParams(max_tokens=100, stop=("world",)), "Hello, ", "stop", "world"),
        (SamplingParams(max_tokens=100, stop_token_ids=(ord("!"),)), "Hello, world!", "stop", ord("!")),
        (SamplingParams(max_tokens=30, ignore_eos=True), REPLY, "length", None),  # EOS tokens skipped in the text
    ],
)
def test_finish_paths(params, text, finish_reason, stop_reason):
    outputs = run_alone(params)
    assert "".join(output.new_text for output in outputs) == text
    assert [output.is_finished for output in outputs].count(True) == 1 and outputs[-1].is_finished
    assert outputs[-1].finish_reason == finish_reason
    assert outputs[-1].stop_reason == stop_reason


def test_eos_counts_only_from_min_tokens_on():
    """The runner says EOS from the third token on; it ends the request only at min_tokens."""
    outputs = run_alone(SamplingParams(max_tokens=40, min_tokens=30), ScriptedRunner(reply="ab"))
    assert outputs[-1].num_output_tokens == 30 and outputs[-1].finish_reason == "stop"
    assert [t for output in outputs for t in output.new_token_ids].count(EOS_TOKEN_ID) == 28
    assert "".join(output.new_text for output in outputs) == "ab"


def test_abort_frees_blocks_and_ends_the_request():
    core = fake_core()
    core.add_request(core.make_request("r", PROMPT * 10, SamplingParams(max_tokens=50)))
    core.step()
    assert core.scheduler.block_manager.num_used_blocks > 0
    output = core.abort("r")
    assert output.finish_reason == "abort" and core.scheduler.block_manager.num_used_blocks == 0
    assert not core.has_unfinished and core.abort("r") is None


def test_the_runner_forgets_finished_requests_even_after_a_failed_step():
    """Finishes reach the runner with the next step that runs; when a step
    fails before the runner saw it, the finishes it carried come again."""
    runner = ScriptedRunner()
    core = fake_core(runner)
    core.add_request(core.make_request("done", PROMPT, SamplingParams(max_tokens=1)))
    core.step()
    assert not core.has_unfinished and "done" in runner.requests  # nothing has run since
    core.add_request(core.make_request("bad", PROMPT, SamplingParams(max_tokens=5)))
    lost = core.schedule()
    assert lost.finished_request_ids == ["done"]
    (failed,) = core.fail_step(lost, "the runner raised before reading the step")
    assert failed.finish_reason == "error"
    core.add_request(core.make_request("next", PROMPT, SamplingParams(max_tokens=5)))
    core.step()
    assert "done" not in runner.requests and "bad" not in runner.requests and "next" in runner.requests
    assert len(runner.requests) == 1


async def collect(stream) -> list:
    return [output async for output in stream]


async def test_batcher_abort_lands_within_one_step():
    runner = ScriptedRunner(reply="x" * 200)
    batcher = fake_batcher(runner)
    await batcher.start()
    try:
        stream = await batcher.generate(PROMPT, SamplingParams(max_tokens=200), "gone")
        other = asyncio.create_task(collect(await batcher.generate(PROMPT, SamplingParams(max_tokens=30), "stays")))
        await anext(stream)
        await stream.aclose()  # the consumer leaves: abort
        step_at_leave = runner.num_steps
        outputs = await other
        steps_with_gone = [i for i, ids in enumerate(runner.steps) if "gone" in ids]
        assert steps_with_gone[-1] <= step_at_leave  # at most the step in flight
        assert "".join(o.new_text for o in outputs) == "x" * 30
        assert batcher.core.scheduler.block_manager.num_used_blocks == 0
    finally:
        await batcher.stop()


async def test_closing_a_stream_never_iterated_aborts_its_request():
    """An async generator that never started runs no ``finally``: the stream
    itself aborts on ``aclose``, and the request's blocks go back."""
    runner = ScriptedRunner(reply="x" * 200)
    batcher = fake_batcher(runner)
    await batcher.start()
    try:
        stream = await batcher.generate(PROMPT, SamplingParams(max_tokens=200), "never-read")
        await stream.aclose()
        outputs = await collect(await batcher.generate(PROMPT, SamplingParams(max_tokens=5), "after"))
        assert "".join(o.new_text for o in outputs) == "x" * 5
        assert "never-read" not in batcher.core.scheduler.requests
        assert batcher.core.scheduler.block_manager.num_used_blocks == 0
    finally:
        await batcher.stop()


async def test_a_failing_step_ends_only_its_requests():
    batcher = fake_batcher(ScriptedRunner(fail_on=lambda request_id: request_id == "bad"))
    await batcher.start()
    try:
        bad = await collect(await batcher.generate(PROMPT, SamplingParams(max_tokens=5), "bad"))
        assert bad[-1].error and bad[-1].finish_reason == "error"
        good = await collect(await batcher.generate(PROMPT, SamplingParams(max_tokens=5), "good"))
        assert "".join(o.new_text for o in good) == REPLY[:5] and good[-1].error is None
        assert batcher.is_running and batcher.core.scheduler.block_manager.num_used_blocks == 0
    finally:
        await batcher.stop()


async def test_a_dead_loop_fails_every_open_stream_and_refuses_new_work():
    batcher = fake_batcher()

    def broken_process(*_args):
        raise RuntimeError("bug in text processing")

    batcher.core.process = broken_process
    await batcher.start()
    try:
        outputs = await collect(await batcher.generate(PROMPT, SamplingParams(max_tokens=5), "r"))
        assert outputs[-1].error and "bug in text processing" in outputs[-1].error
        await asyncio.sleep(0)
        assert not batcher.is_running and "RuntimeError" in batcher.failure
        with pytest.raises(Exception, match="not running"):
            batcher.check_available()
    finally:
        await batcher.stop()


def test_a_failing_runner_fails_the_step_not_its_caller():
    """``EngineCore.step`` is the one step function: the batcher's loop adds
    no failure handling of its own, so the core turns a raising runner into
    error deltas for the step's requests and counts no step."""
    core = fake_core(ScriptedRunner(fail_on=lambda request_id: request_id == "bad"))
    core.add_request(core.make_request("bad", PROMPT, SamplingParams(max_tokens=5)))
    (failed,) = core.step()
    assert failed.finish_reason == "error" and "scripted step failure" in failed.error and failed.error_status == 500
    assert not core.has_unfinished and core.scheduler.block_manager.num_used_blocks == 0
    assert core.num_steps == 0 and not core.step_records


def running_request(batcher, request_id: str):
    return batcher.core.scheduler.requests[request_id]


@pytest.mark.parametrize("how", ["drain", "stop"])
async def test_drain_and_stop_end_requests_through_the_one_error_finish(how: str):
    """Requests still running when the server drains or stops end with an
    error delta (503) that the scheduler records as FINISHED_ERROR, blocks
    freed at once: the same finish as a failed step, not a stream ended
    behind the scheduler's back."""
    batcher = fake_batcher(ScriptedRunner(reply="x" * 500))
    await batcher.start()
    try:
        stream = await batcher.generate(PROMPT, SamplingParams(max_tokens=500), "long")
        await anext(stream)
        request = running_request(batcher, "long")
        if how == "drain":
            assert await batcher.drain(timeout_s=0) == 1
        else:
            await batcher.stop()
        outputs = [output async for output in stream]
        assert outputs[-1].finish_reason == "error" and outputs[-1].error_status == 503
        assert request.status == RequestStatus.FINISHED_ERROR
        assert batcher.core.scheduler.block_manager.num_used_blocks == 0 and not batcher.core.has_unfinished
    finally:
        await batcher.stop()

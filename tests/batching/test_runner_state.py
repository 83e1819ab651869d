"""The runner's view of the requests (``batching.runner_state``), rebuilt
from the step deltas alone, stays equal to the scheduler's requests through
chunked prefill, preemption, aborts and accepted speculative drafts."""

from batching.block_manager import BlockManager
from batching.messages import RunnerOutput, SampledToken, SchedulerOutput
from batching.request import Request, RequestStatus
from batching.runner_state import RunnerRequests
from batching.sampling_params import SamplingParams
from batching.scheduler import Scheduler
from batching.scheduler_config import SchedulerConfig
from tests.batching.factories import check_runner_view, check_schedule, token_ids

CYCLE = [5, 6, 7, 8]


def greedy_request(request_id: str, prompt_token_ids: list[int], max_tokens: int) -> Request:
    return Request(request_id, prompt_token_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))


class CyclingRunner:
    """A model that always continues the cycle: the token at position p is
    ``CYCLE[p % 4]``. It reads p from its own view of each request, so a
    view that lost a token (an accepted draft, say) breaks the cycle."""

    def __init__(self) -> None:
        self.requests = RunnerRequests()

    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        sampled = []
        for chunk, request in zip(scheduler_output.chunks, self.requests.apply(scheduler_output)):
            if not chunk.is_sampling:
                continue
            position = request.num_tokens
            accepted = []
            for draft in chunk.draft_token_ids:
                if draft != CYCLE[(position + len(accepted)) % len(CYCLE)]:
                    break
                accepted.append(draft)
            sampled.append(SampledToken(chunk.request_id, CYCLE[(position + len(accepted)) % len(CYCLE)], None, accepted))
        return RunnerOutput(sampled=sampled)


def test_the_view_follows_accepted_drafts_preemption_and_aborts():
    # 10 blocks of 4 tokens cannot hold the four requests at full length: preemption.
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, num_speculative_tokens=3)
    scheduler = Scheduler(config, BlockManager(10, 4))
    prompt = CYCLE * 3
    requests = [greedy_request(f"r{i}", prompt[: 6 + i], max_tokens=14) for i in range(4)]
    requests.append(greedy_request("aborted", prompt, max_tokens=14))
    for request in requests:
        scheduler.add_request(request)
    runner = CyclingRunner()
    for step in range(200):
        if not scheduler.has_unfinished:
            break
        scheduler_output = scheduler.schedule()
        check_schedule(scheduler, scheduler_output)
        runner_output = runner.step(scheduler_output)
        check_runner_view(scheduler, scheduler_output, runner.requests)
        scheduler.update_from_output(scheduler_output, runner_output)
        if step == 3:
            scheduler.finish_request("aborted", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished
    for request in requests[:4]:
        tokens = token_ids(request)
        assert tokens == [CYCLE[p % 4] for p in range(len(tokens))] and request.num_output_tokens == 14
    assert scheduler.num_preemptions > 0
    assert scheduler.num_accepted_tokens > 0
    scheduler.schedule()  # nothing left to run: the last finishes wait for the next step
    scheduler.add_request(greedy_request("last", prompt, max_tokens=1))
    runner.step(scheduler.schedule())
    assert len(runner.requests) == 1 and "last" in runner.requests

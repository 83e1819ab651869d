"""Factories for policy tests without weights (vLLM style, STYLE.md item 13).

``create_scheduler()`` / ``create_requests()`` build the objects under test;
``FakeRunner`` answers a ``SchedulerOutput`` with hand-written ``SampledToken``s
(token ``100 + step``, never EOS), so requests finish by ``max_tokens`` through
``check_token_stop``; ``run_step`` / ``run_to_completion`` drive the
``schedule()`` -> runner -> ``update_from_output()`` loop.
"""

from collections.abc import Sequence

from batching.block_manager import BlockManager
from batching.messages import RunnerOutput, SampledToken, SchedulerOutput
from batching.request import Request
from batching.sampling_params import SamplingParams
from batching.scheduler import Scheduler, SchedulerConfig, TokenUpdate

EOS_TOKEN_ID = 2
BLOCK_SIZE = 16
FIRST_SAMPLED_TOKEN_ID = 100


def create_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = BLOCK_SIZE,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 512,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(config, block_manager)


def create_request(request_id: str, prompt_token_ids: Sequence[int], max_tokens: int = 16) -> Request:
    return Request(
        request_id,
        list(prompt_token_ids),
        SamplingParams(max_tokens=max_tokens),
        eos_token_id=EOS_TOKEN_ID,
    )


def create_requests(
    num_requests: int,
    *,
    num_tokens: int = 10,
    max_tokens: int = 16,
    prefix: Sequence[int] = (),
    first_index: int = 0,
) -> list[Request]:
    """``num_requests`` requests ``req-<i>`` whose prompts are ``prefix`` plus
    ``num_tokens - len(prefix)`` tokens unique to each request (no accidental
    prefix hits between them)."""
    requests = []
    for index in range(first_index, first_index + num_requests):
        unique = [1000 * (index + 1) + j for j in range(num_tokens - len(prefix))]
        requests.append(create_request(f"req-{index}", [*prefix, *unique], max_tokens))
    return requests


class FakeRunner:
    """Samples token ``100 + step`` for every chunk with ``is_sampling``."""

    def __init__(self) -> None:
        self.num_steps = 0

    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        token_id = FIRST_SAMPLED_TOKEN_ID + self.num_steps
        self.num_steps += 1
        return RunnerOutput(
            sampled=[
                SampledToken(chunk.request_id, token_id)
                for chunk in scheduler_output.chunks
                if chunk.is_sampling
            ]
        )


def run_step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[TokenUpdate]]:
    scheduler_output = scheduler.schedule()
    updates = scheduler.update_from_output(scheduler_output, runner.step(scheduler_output))
    return scheduler_output, updates


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 1000) -> list[SchedulerOutput]:
    """Step until nothing is left; fails if that takes more than ``max_steps``."""
    outputs = []
    while scheduler.has_unfinished:
        assert len(outputs) < max_steps, "scheduler made no progress"
        scheduler_output, _ = run_step(scheduler, runner)
        outputs.append(scheduler_output)
    return outputs


def ref_count(block_manager: BlockManager, block_id: int) -> int:
    """The one peek at private state: a block's reference count."""
    return block_manager._blocks[block_id].ref_count


def assert_no_leak(scheduler: Scheduler) -> None:
    block_manager = scheduler.block_manager
    assert block_manager.num_used_blocks == 0
    assert block_manager.num_free_blocks == block_manager.num_blocks
    assert all(ref_count(block_manager, b) == 0 for b in range(block_manager.num_blocks))

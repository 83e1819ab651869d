"""Factories for policy tests without weights (vLLM style, STYLE.md item 13).

``create_scheduler()`` / ``create_requests()`` build the objects under test;
``FakeRunner`` answers a ``SchedulerOutput`` with hand-written ``SampledToken``s
(token ``100 + step``, never EOS), so requests finish by ``max_tokens`` through
``check_token_stop``; ``run_step`` / ``run_to_completion`` drive the
``schedule()`` -> runner -> ``update_from_output()`` loop. ``check_invariants``,
``check_schedule`` and ``Driver`` serve the random-operation (hypothesis) test.
"""

from collections import Counter
from collections.abc import Sequence

import pytest

from batching.block_manager import BlockManager
from batching.errors import InvalidRequestError
from batching.messages import RunnerOutput, SampledToken, SchedulerOutput
from batching.request import Request, RequestStatus
from batching.runner_state import RunnerRequests
from batching.sampling_params import SamplingParams
from batching.scheduler import Scheduler, TokenUpdate
from batching.scheduler_config import SchedulerConfig

EOS_TOKEN_ID = 2
BLOCK_SIZE = 16
FIRST_SAMPLED_TOKEN_ID = 100


def token_ids(request: Request) -> list[int]:
    """Prompt + output, joined plainly: the checks' oracle for what the
    scheduler sends, which it cuts with ``Request.token_slice``."""
    return request.prompt_token_ids + request.output_token_ids


def create_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = BLOCK_SIZE,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 512,
    enable_prefix_caching: bool = True,
    tokens_per_running_request: int = 0,
    sliding_window: int | None = None,
) -> Scheduler:
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching, sliding_window=sliding_window)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, tokens_per_running_request=tokens_per_running_request
    )
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
    """Samples token ``100 + step`` for every chunk with ``is_sampling``; keeps
    its view of the requests from the step messages, as the model runner does."""

    def __init__(self) -> None:
        self.num_steps = 0
        self.requests = RunnerRequests()

    def step(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.requests.apply(scheduler_output)
        token_id = FIRST_SAMPLED_TOKEN_ID + self.num_steps
        self.num_steps += 1
        return RunnerOutput(sampled=[SampledToken(chunk.request_id, token_id) for chunk in scheduler_output.chunks if chunk.is_sampling])


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


def abort_request(scheduler: Scheduler, request_id: str) -> Request | None:
    return scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)


def ref_count(block_manager: BlockManager, block_id: int) -> int:
    """The one peek at private state: a block's reference count."""
    return block_manager._blocks[block_id].ref_count


def assert_no_leak(scheduler: Scheduler) -> None:
    block_manager = scheduler.block_manager
    assert block_manager.num_used_blocks == 0
    assert block_manager.num_free_blocks == block_manager.num_blocks
    assert all(ref_count(block_manager, b) == 0 for b in range(block_manager.num_blocks))


# --- invariants and a random-operation driver (used by the hypothesis test) ---------


def check_invariants(scheduler: Scheduler, requests: list[Request]) -> None:
    """Block accounting holds; shared blocks hold identical prefixes."""
    block_manager = scheduler.block_manager
    block_size = block_manager.block_size
    assert block_manager.num_free_blocks + block_manager.num_used_blocks == block_manager.num_blocks
    assert len(scheduler.running) <= scheduler.config.max_num_seqs

    holders: Counter[int] = Counter()
    first_holder: dict[int, tuple[Request, int]] = {}
    for request in requests:
        if request.is_finished or request.status != RequestStatus.RUNNING:
            assert request.block_ids == []
        if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            assert request.num_computed_tokens == 0
            assert request in scheduler.waiting
        held = request.block_ids[request.num_dropped_blocks :]  # the dropped ones are stale ids
        assert len(set(held)) == len(held)
        holders.update(held)
        if request.status != RequestStatus.RUNNING:
            continue
        assert request in scheduler.running
        assert request.num_computed_tokens < request.num_tokens
        assert block_manager.blocks_needed(request.num_computed_tokens) <= len(request.block_ids)
        if block_manager.sliding_window is None:
            assert request.num_dropped_blocks == 0
        else:  # nothing the next query can see was dropped; nothing wholly before it is held
            first_visible = max(request.num_computed_tokens - block_manager.sliding_window + 1, 0)
            assert request.num_dropped_blocks == min(first_visible // block_size, len(request.block_ids))
        for index, block_id in enumerate(request.block_ids):
            if index < request.num_dropped_blocks:
                continue
            if block_id not in first_holder:
                first_holder[block_id] = (request, index)
                continue
            # A block held twice is a cached prefix block: same place, same tokens.
            other, other_index = first_holder[block_id]
            end = (index + 1) * block_size
            assert index == other_index
            assert min(request.num_computed_tokens, other.num_computed_tokens) >= end
            assert token_ids(request)[:end] == token_ids(other)[:end]

    ref_counts = [ref_count(block_manager, b) for b in range(block_manager.num_blocks)]
    assert ref_counts == [holders[b] for b in range(block_manager.num_blocks)]
    assert sum(ref_counts) == sum(len(r.block_ids) - r.num_dropped_blocks for r in requests)
    assert block_manager.num_free_blocks == ref_counts.count(0)
    assert set(scheduler.requests.values()) == set(scheduler.running) | set(scheduler.waiting)


def check_schedule(scheduler: Scheduler, scheduler_output: SchedulerOutput) -> None:
    """The step about to run is consistent with the requests it names."""
    assert scheduler_output.num_batched_tokens <= scheduler.config.max_num_batched_tokens
    assert scheduler_output.num_batched_tokens == sum(c.num_new_tokens for c in scheduler_output.chunks)
    assert len({c.request_id for c in scheduler_output.chunks}) == len(scheduler_output.chunks)
    for chunk in scheduler_output.chunks:
        request = scheduler.requests[chunk.request_id]
        assert request.status == RequestStatus.RUNNING
        start, end = chunk.num_computed_tokens, chunk.num_computed_tokens + len(chunk.own_token_ids)
        assert chunk.num_new_tokens >= 1
        assert start == request.num_computed_tokens
        assert chunk.own_token_ids == token_ids(request)[start:end]
        assert chunk.is_sampling == (end == request.num_tokens)
        assert not chunk.draft_token_ids or chunk.is_sampling
        assert scheduler.block_manager.blocks_needed(end + chunk.speculation.num_slots) <= len(request.block_ids)
    for request_id in scheduler_output.preempted_request_ids:
        assert scheduler.requests[request_id].status == RequestStatus.PREEMPTED
        assert request_id not in {c.request_id for c in scheduler_output.chunks}
    for request_id in scheduler_output.finished_request_ids:
        assert request_id not in scheduler.requests


def check_runner_view(scheduler: Scheduler, scheduler_output: SchedulerOutput, runner_requests: RunnerRequests) -> None:
    """What the runner rebuilt from the step's deltas is what the scheduler
    holds: each scheduled request's block table, and a prefix of its tokens
    that reaches at least the end of its chunk and, when it samples, exactly
    there (an admission sends every token the request holds). Finished and
    preempted requests are gone from it."""
    for chunk in scheduler_output.chunks:
        request = scheduler.requests.get(chunk.request_id)
        if request is None:  # aborted while the step ran
            continue
        view = runner_requests[chunk.request_id]
        end = chunk.num_computed_tokens + len(chunk.own_token_ids)
        tokens = view.prompt_token_ids + view.output_token_ids
        assert view.block_ids == request.block_ids
        assert tokens == token_ids(request)[: len(tokens)] and len(tokens) >= end
        assert not chunk.is_sampling or len(tokens) == end
    for request_id in (*scheduler_output.finished_request_ids, *scheduler_output.preempted_request_ids):
        assert request_id not in runner_requests


class Driver:
    """Applies operations and records what each request was sent."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.runner = FakeRunner()
        self.requests: list[Request] = []
        self.sent: dict[str, list[int]] = {}

    def add(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        request = create_request(f"r{len(self.requests)}", prompt_token_ids, max_tokens)
        too_big = self.scheduler.block_manager.max_blocks_held(request.max_total_tokens, self.scheduler.config.max_step_tokens) > (
            self.scheduler.block_manager.num_blocks
        )
        if too_big:
            with pytest.raises(InvalidRequestError):
                self.scheduler.add_request(request)
            return
        self.scheduler.add_request(request)
        self.requests.append(request)
        self.sent[request.request_id] = []

    def step(self, abort_index: int | None = None) -> None:
        scheduler_output = self.scheduler.schedule()
        check_schedule(self.scheduler, scheduler_output)
        aborted = None
        if abort_index is not None and self.requests:
            aborted = self.requests[abort_index % len(self.requests)].request_id
            abort_request(self.scheduler, aborted)
        runner_output = self.runner.step(scheduler_output)
        check_runner_view(self.scheduler, scheduler_output, self.runner.requests)
        updates = self.scheduler.update_from_output(scheduler_output, runner_output)
        for update in updates:
            assert update.request.request_id != aborted
            self.sent[update.request.request_id].append(update.token_id)

    def abort(self, index: int) -> None:
        if self.requests:
            abort_request(self.scheduler, self.requests[index % len(self.requests)].request_id)

    def apply(self, operation: tuple) -> None:
        kind, *args = operation
        if kind == "add":
            self.add(*args)
        elif kind == "step":
            self.step()
        elif kind == "abort":
            self.abort(*args)
        else:
            self.step(abort_index=args[0])

    def check(self) -> None:
        check_invariants(self.scheduler, self.requests)
        for request in self.requests:
            assert request.output_token_ids == self.sent[request.request_id]
            assert request.num_output_tokens <= request.sampling_params.max_tokens

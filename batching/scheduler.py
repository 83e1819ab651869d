"""The scheduling policy: which requests run in the next step, and how many
tokens each.

Per step one token budget (``max_num_batched_tokens``, raised to
``tokens_per_running_request`` times the running requests when that is
larger) serves decode and prefill alike: running requests go first (one
token each when decoding, or their next prompt chunk), then waiting
requests are admitted first-come first-served with whatever budget is left,
their prompts chunked to fit. So a long prompt never stalls decoding, and
chunked prefill is not a special case. A pooling request (an embedding)
is admitted whole, with no blocks, and finishes after its one step with the
vector the runner pooled (``finish_pooled``).
When KV blocks run out, the most recently admitted request is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed
(prompt plus the tokens it already produced) when blocks free up.
With ``num_speculative_tokens``, a decoding greedy request may also carry
draft tokens (``batching.speculative``: n-gram lookup, or what a draft model
proposed after the last step) when the budget and free blocks allow, as the
chunk's one ``SpeculationPlan``;
``update_from_output`` then appends the ones the model agreed with. With a
draft model, a chunk that samples also asks the runner for the next step's
drafts (``num_lookahead_tokens``), and its blocks cover the positions the
draft model writes while proposing them.
"""

import time
from collections import deque
from dataclasses import dataclass

from batching.block_manager import BlockManager
from batching.errors import InvalidRequestError
from batching.messages import (
    NO_SPECULATION,
    NewRequestData,
    RunnerOutput,
    SampledToken,
    ScheduledChunk,
    SchedulerOutput,
    SpeculationPlan,
    TokenLogprobs,
)
from batching.policies import ADMISSION_POLICIES, PREEMPTION_POLICIES
from batching.request import Request, RequestStatus
from batching.scheduler_config import SchedulerConfig
from batching.speculative import DraftModelProposer, NgramProposer, Proposer, can_speculate
from batching.stop import StopDecision, check_token_stop

PROPOSERS: dict[str, type[Proposer]] = {"ngram": NgramProposer, "draft_model": DraftModelProposer}


@dataclass(frozen=True, slots=True)
class TokenUpdate:
    """A token appended to a request by ``update_from_output``."""

    request: Request
    token_id: int
    logprobs: TokenLogprobs | None


class Scheduler:
    """Owns the waiting and running queues and the block manager."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.proposer = PROPOSERS[config.speculative_method]()
        self.admission = ADMISSION_POLICIES[config.admission_policy]()
        self.preemption = PREEMPTION_POLICIES[config.preemption_policy]()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # Finished since the last step that ran; the next step tells the runner.
        self.finished_request_ids: list[str] = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        """Queue a request; reject it at once if it could never fit the cache."""
        self.check_fits(request)
        if request.request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def check_fits(self, request: Request) -> None:
        """Raise ``InvalidRequestError`` if the request could never fit the cache alone."""
        if request.pooling is not None:
            return  # it holds no blocks
        manager = self.block_manager
        needed = manager.max_blocks_held(request.max_total_tokens, self.config.max_step_tokens) + manager.blocks_needed(
            request.num_encoder_tokens
        )
        if needed > manager.num_blocks:
            capacity = manager.num_blocks * manager.block_size
            source = f"a source of {request.num_encoder_tokens} tokens, " if request.encoder_token_ids is not None else ""
            raise InvalidRequestError(
                f"{source}prompt ({request.num_prompt_tokens} tokens) plus max_tokens "
                f"({request.sampling_params.max_tokens}) needs {needed * manager.block_size} KV cache "
                f"slots, but the whole cache holds {capacity}; lower max_tokens or raise "
                "--kv-cache-memory",
                param="max_tokens",
            )

    def schedule(self) -> SchedulerOutput:
        """One step's work, the same for every model: the running requests
        first (decode, prefill chunks, drafts), then admissions while the
        token budget lasts. An admission costs its chunk plus the tokens it
        runs once on admission (``Request.num_encoder_tokens``: the source an
        encoder-decoder model's encoder reads whole; 0 for a decoder-only
        model); the step's first admission may overrun the budget by those,
        so no source waits for ever behind running requests."""
        step_budget = max(self.config.max_num_batched_tokens, self.config.tokens_per_running_request * len(self.running))
        token_budget = step_budget  # what is left of it; 0 once spent (or overrun)
        scheduled: list[tuple[Request, int, int]] = []  # (request, tokens, blocks the runner already has)
        plans: dict[str, SpeculationPlan] = {}
        preempted: list[str] = []
        num_batched_tokens = 0

        for request in list(self.running):
            if token_budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, token_budget)
            num_sent_blocks = len(request.block_ids)
            plan = self._speculation_plan(request, num_new, token_budget)
            if plan is not None and self.block_manager.allocate(request, num_new + plan.num_slots):
                plans[request.request_id] = plan
                num_new += len(plan.draft_token_ids)
            elif not self._allocate_or_preempt(request, num_new, preempted):
                continue
            scheduled.append((request, num_new, num_sent_blocks))
            num_batched_tokens += num_new
            token_budget -= num_new

        first = True
        while self.waiting and token_budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.admission.next_to_admit(self.waiting)
            num_new = self._admit(request, token_budget, plans, first=first)
            if not num_new:
                break
            first = False
            scheduled.append((request, num_new, 0))
            num_batched_tokens += num_new + request.num_encoder_tokens
            token_budget = max(step_budget - num_batched_tokens, 0)

        return self._output(scheduled, plans, num_batched_tokens, preempted)

    def _admit(self, request: Request, token_budget: int, plans: dict[str, SpeculationPlan] | None = None, first: bool = False) -> int:
        """Admit ``request`` with ``token_budget`` tokens left in the step:
        blocks, cross blocks for its source, then the running queue. The
        encoder reads a source whole, so it must fit the budget left beside
        at least one decoder token, unless it is the step's ``first``
        admission (which may overrun the budget by its source: else a source
        longer than what decoding leaves would wait as long as they run).
        Returns its chunk's number of new tokens, or 0 when it must wait
        (nothing changed)."""
        if request.pooling is not None:
            return self._admit_pooling(request, token_budget, first)
        num_encoder = request.num_encoder_tokens
        if not first and num_encoder >= token_budget:
            return 0
        cached_block_ids, num_cached = self.block_manager.find_cached_prefix(request)
        num_new = min(request.num_tokens - num_cached, max(token_budget - num_encoder, 1))
        request.num_computed_tokens = 0
        if not self.block_manager.allocate_cross(request):  # none to take without a source
            return 0
        if not self.block_manager.allocate(request, num_new, cached_block_ids):
            if request.cross_block_ids:
                self.block_manager.free(request)  # the cross blocks just taken
            return 0
        self._start_running(request)
        request.num_computed_tokens = num_cached
        request.num_cached_tokens = num_cached
        self.block_manager.drop_out_of_window(request)  # a long cached prefix: keep only its window
        plan = self._speculation_plan(request, num_new, draft_budget=0)  # no drafts before the first token
        if plan is not None and plans is not None and self.block_manager.allocate(request, num_new + plan.num_slots):
            plans[request.request_id] = plan
        self.num_prefix_query_tokens += request.num_tokens
        self.num_prefix_hit_tokens += num_cached
        return num_new

    def _admit_pooling(self, request: Request, token_budget: int, first: bool) -> int:
        """A pooling request runs its whole prompt in one step (an encoder
        attends over all of it at once) and holds no blocks: it waits while
        the prompt does not fit the budget left, unless it is the step's
        ``first`` admission (so no long input waits for ever)."""
        if not first and request.num_tokens > token_budget:
            return 0
        self._start_running(request)
        return request.num_tokens

    def _start_running(self, request: Request) -> None:
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        self.running.append(request)

    def _output(
        self, scheduled: list[tuple[Request, int, int]], plans: dict[str, SpeculationPlan], num_batched_tokens: int, preempted: list[str]
    ) -> SchedulerOutput:
        chunks = [
            self._chunk(request, num_new, plans.get(request.request_id, NO_SPECULATION), num_sent)
            for request, num_new, num_sent in scheduled
        ]
        finished, self.finished_request_ids = (self.finished_request_ids, []) if chunks else ([], self.finished_request_ids)
        return SchedulerOutput(
            chunks=chunks,
            num_batched_tokens=num_batched_tokens,
            preempted_request_ids=preempted,
            finished_request_ids=finished,
        )

    def step_failed(self, scheduler_output: SchedulerOutput) -> None:
        """The runner may not have seen ``scheduler_output``: tell it again
        about the requests it named as finished (the engine then fails the
        step's own requests, which finish too)."""
        self.finished_request_ids.extend(scheduler_output.finished_request_ids)

    def finish_pooled(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[tuple[Request, list[float] | None]]:
        """Finish the step's pooling requests, each with its vector (None, and
        an error finish, where the runner gave none). Those finished or
        aborted while the step ran are skipped."""
        vectors = {pooled.request_id: pooled.values for pooled in runner_output.pooled}
        finished: list[tuple[Request, list[float] | None]] = []
        for chunk in scheduler_output.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or request.pooling is None or request.status != RequestStatus.RUNNING:
                continue
            request.num_computed_tokens = request.num_tokens
            values = vectors.get(chunk.request_id)
            self.finish(request, StopDecision(RequestStatus.FINISHED_STOPPED if values is not None else RequestStatus.FINISHED_ERROR))
            finished.append((request, values))
        return finished

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[TokenUpdate]:
        """Advance computed counters, append sampled tokens, cache the blocks
        that became full, then apply token stops.

        Requests finished or aborted while the step ran are skipped. A
        speculating request gets its accepted draft tokens and then the
        model's own next token, each checked for a stop; the KV of rejected
        drafts does not count as computed (it is overwritten later).
        """
        sampled_by_id = {sampled.request_id: sampled for sampled in runner_output.sampled}
        updates: list[TokenUpdate] = []
        for chunk in scheduler_output.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            sampled = sampled_by_id.get(chunk.request_id)
            num_accepted = len(sampled.accepted_draft_ids) if sampled is not None else 0
            if chunk.draft_token_ids:
                self.num_draft_tokens += len(chunk.draft_token_ids)
                self.num_accepted_tokens += num_accepted
            request.num_computed_tokens += chunk.num_new_tokens - (len(chunk.draft_token_ids) - num_accepted)
            request.draft_token_ids = sampled.next_draft_token_ids if sampled is not None else []
            stop = None if sampled is None else self._append(request, sampled, updates)
            # Blocks are keyed by their tokens, so cache them once the tokens are in;
            # a stop among accepted drafts leaves the positions after it uncomputed.
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            self.block_manager.cache_full_blocks(request)
            self.block_manager.drop_out_of_window(request)
            if stop is not None:
                self.finish(request, stop)
        return updates

    @staticmethod
    def _append(request: Request, sampled: SampledToken, updates: list[TokenUpdate]) -> StopDecision | None:
        """Append the accepted drafts and the sampled token, up to the first stop."""
        tokens = [*sampled.accepted_draft_ids, sampled.token_id]
        for index, token_id in enumerate(tokens):
            request.output_token_ids.append(token_id)
            updates.append(TokenUpdate(request, token_id, sampled.logprobs if index == len(tokens) - 1 else None))
            stop = check_token_stop(request, token_id)
            if stop is not None:
                return stop
        return None

    def _speculation_plan(self, request: Request, num_new: int, draft_budget: int) -> SpeculationPlan | None:
        """What this chunk asks of speculation (None: nothing): drafts to
        verify, within ``draft_budget`` tokens, and a lookahead for the draft
        model."""
        draft = self._draft(request, num_new, draft_budget)
        lookahead = self._lookahead(request, num_new, len(draft))
        return SpeculationPlan(draft, lookahead) if draft or lookahead else None

    def _draft(self, request: Request, num_new: int, token_budget: int) -> list[int]:
        """Draft tokens for a decoding request, within the step's budget,
        its ``max_tokens`` and the context it may still fill."""
        k = self.config.num_speculative_tokens
        if not k or num_new != 1 or not can_speculate(request):
            return []
        room = request.sampling_params.max_tokens - request.num_output_tokens - 1
        k = min(k, token_budget - 1, room)
        if k <= 0:
            return []
        return self.proposer.propose(request, k)

    def _lookahead(self, request: Request, num_new: int, num_draft: int) -> int:
        """How many drafts the runner's draft model should propose after this
        step: none unless the chunk samples, and never past ``max_tokens``."""
        k = self.config.num_speculative_tokens
        if not k or request.num_computed_tokens + num_new != request.num_tokens:
            return 0
        room = request.sampling_params.max_tokens - request.num_output_tokens - 1 - num_draft
        return max(min(self.proposer.num_lookahead(request, k), room), 0)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request by id; None if it is not (or no longer) here."""
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, StopDecision(status))
        return request

    def finish(self, request: Request, decision: StopDecision) -> None:
        """The one place a finish is decided and recorded: the request's final
        status and what matched (``stop_reason``); its blocks go back to the
        pool. Token stops, the grammar's end and stop strings all arrive here.
        A request already finished in this step (by length, say) whose text
        then completes a stop string is re-recorded as stopped by it."""
        if self.requests.pop(request.request_id, None) is not None:
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            self.block_manager.free(request)
            self.finished_request_ids.append(request.request_id)
        request.status = decision.status
        request.stop_reason = decision.stop_reason

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Allocate blocks for ``request``, preempting the preemption policy's
        victims (by default the newest requests) until they fit.

        Returns False when ``request`` itself had to be preempted.
        """
        while not self.block_manager.allocate(request, num_new):
            # Only requests this step has not scheduled yet may lose their blocks.
            victim = self.preemption.choose_victim(self.running[self.running.index(request) :])
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.admission.requeue_preempted(self.waiting, request)

    @staticmethod
    def _chunk(request: Request, num_new: int, plan: SpeculationPlan, num_sent_blocks: int) -> ScheduledChunk:
        """The chunk as a delta: the whole request only on its first chunk
        after admission (``num_sent_blocks == 0``), else its new tokens and
        the blocks added since the runner last heard of it."""
        draft = plan.draft_token_ids
        start = request.num_computed_tokens
        end = start + num_new - len(draft)  # the request's own tokens; the drafts follow them
        new_request = None
        if num_sent_blocks == 0:
            new_request = NewRequestData(
                request.prompt_token_ids,
                list(request.output_token_ids),
                request.sampling_params,
                request.eos_token_id,
                request.encoder_token_ids,
                list(request.cross_block_ids),
                request.pooling,
            )
        return ScheduledChunk(
            request_id=request.request_id,
            new_token_ids=request.token_slice(start, end) + draft,
            num_computed_tokens=start,
            new_block_ids=request.block_ids[num_sent_blocks:],
            is_sampling=end == request.num_tokens and request.pooling is None,
            new_request=new_request,
            grammar_bitmask=request.grammar.next_token_bitmask() if request.grammar is not None and end == request.num_tokens else None,
            speculation=plan,
        )

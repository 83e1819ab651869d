"""The runner's half of the step protocol: what it keeps about each request it
serves, rebuilt from the step messages alone (as vLLM v1's
``CachedRequestState``).

A ``ScheduledChunk`` carries a request's constant data and tokens once per
admission (``NewRequestData``) and afterwards only deltas: the blocks added
to its table and its new tokens. ``RunnerRequests.apply`` folds each
``SchedulerOutput`` into one ``RunnerRequest`` per request, so per step the
runner does work in the size of the deltas, never in the length of a
request's output. Plain Python, no torch: the fake runners of the tests use
it as the model runner does.

How the output tokens are learned: a decoding chunk's own token is the one
sampled last step, at the first position the runner has not seen; when that
position lies past ``num_tokens``, the gap is the drafts of the request's
previous chunk that the model accepted (the scheduler counted them as
computed and never sends them again).
"""

from dataclasses import dataclass, field
from typing import Any

from batching.messages import ScheduledChunk, SchedulerOutput
from batching.sampling_params import SamplingParams


@dataclass(slots=True, eq=False)
class RunnerRequest:
    """One request as the runner sees it.

    Invariant after ``RunnerRequests.apply``: ``prompt_token_ids +
    output_token_ids`` are the request's tokens up to the end of the chunk
    just applied (drafts excluded), and ``block_ids`` is its block table.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int] = field(default_factory=list)
    # Encoder-decoder models: the source and its cross blocks (fixed per admission).
    encoder_token_ids: list[int] | None = None
    cross_block_ids: list[int] = field(default_factory=list)
    # The drafts of the latest chunk; the next chunk says how many were accepted.
    draft_token_ids: list[int] = field(default_factory=list)
    # Per-request state the runner's own stages keep across steps (the
    # sampler's penalty counts, ``model_runtime.sampler.TokenCounts``).
    sampler_state: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


class RunnerRequests:
    """The requests a runner serves, by id, kept in step with the scheduler."""

    def __init__(self) -> None:
        self._requests: dict[str, RunnerRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __getitem__(self, request_id: str) -> RunnerRequest:
        return self._requests[request_id]

    def apply(self, scheduler_output: SchedulerOutput) -> list[RunnerRequest]:
        """Drop finished and preempted requests, then fold in each chunk.
        Returns the chunks' requests, in the order of ``scheduler_output.chunks``."""
        for request_id in (*scheduler_output.finished_request_ids, *scheduler_output.preempted_request_ids):
            self._requests.pop(request_id, None)
        return [self._apply_chunk(chunk) for chunk in scheduler_output.chunks]

    def _apply_chunk(self, chunk: ScheduledChunk) -> RunnerRequest:
        new = chunk.new_request
        if new is not None:
            request = RunnerRequest(
                chunk.request_id,
                new.prompt_token_ids,
                list(new.output_token_ids),
                new.sampling_params,
                new.eos_token_id,
                encoder_token_ids=new.encoder_token_ids,
                cross_block_ids=list(new.cross_block_ids),
            )
            self._requests[chunk.request_id] = request
        else:
            request = self._requests.get(chunk.request_id)
            if request is None:
                raise KeyError(f"chunk for request {chunk.request_id!r}, which the runner was never sent (no NewRequestData)")
        request.block_ids.extend(chunk.new_block_ids)
        num_accepted = chunk.num_computed_tokens - request.num_tokens
        if num_accepted > 0:
            request.output_token_ids.extend(request.draft_token_ids[:num_accepted])
        own = chunk.own_token_ids
        first_unseen = request.num_tokens - chunk.num_computed_tokens
        if first_unseen < len(own):
            request.output_token_ids.extend(own[first_unseen:])
        request.draft_token_ids = chunk.draft_token_ids
        return request

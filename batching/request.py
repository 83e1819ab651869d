"""One request is one object: its tokens, counters, blocks, status, and the
per-request state of every stage that serves it.

Lives on the CPU in plain lists. The scheduler moves it between the waiting
and running queues; the block manager keeps its prefix-cache keys on it; the
engine core keeps its text pipeline on it (detokenizer, stop-string matcher,
grammar, buffered prompt logprobs). No stage holds a side table keyed by
request id, so a finished request takes all of its state with it.
"""

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from batching.detokenizer import IncrementalDetokenizer
from batching.messages import TokenLogprobs
from batching.pooling_params import PoolingParams
from batching.sampling_params import SamplingParams
from batching.stop_strings import StopStringMatcher


class RequestStatus(enum.IntEnum):
    """Ordered lifecycle: everything after RUNNING is finished."""

    WAITING = 0
    PREEMPTED = 1
    RUNNING = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.RUNNING

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True, slots=True)
class EncoderDecoderPrompts:
    """How an encoder-decoder model's requests are built: the client's prompt
    is the source (at most ``max_source_tokens``), and the decoder starts
    from ``decoder_prompt_token_ids`` (its start token, and the token its
    generation config forces first, if any)."""

    decoder_prompt_token_ids: tuple[int, ...]
    max_source_tokens: int


@dataclass(slots=True, eq=False)
class Request:
    """A generation request and its progress.

    Invariants: ``num_computed_tokens <= num_tokens``; the KV of the first
    ``num_computed_tokens`` tokens lives in ``block_ids`` (block i holds tokens
    ``[i * block_size, (i + 1) * block_size)``), from block
    ``num_dropped_blocks`` on. ``num_cached_tokens`` counts
    prompt tokens served from the prefix cache at the latest admission.

    Pooling requests (``pooling`` set): the prompt is the input to pool,
    scheduled whole in one step; no output tokens, no blocks.

    Encoder-decoder models: ``encoder_token_ids`` is the source the encoder
    reads (the prompt the client sent) and ``prompt_token_ids`` the decoder's
    own prompt (its start token); the cross-attention K/V of the source live
    in ``cross_block_ids``, a second, read-only block table held from
    admission to finish or preemption.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    # With a sliding window on every layer (BlockManager.sliding_window): the
    # first ``num_dropped_blocks`` of ``block_ids`` lie wholly before any
    # future query's window and went back to the pool; their ids are stale.
    num_dropped_blocks: int = 0
    encoder_token_ids: list[int] | None = None
    cross_block_ids: list[int] = field(default_factory=list)
    # A pooling request (an embedding): it runs its whole prompt in one step,
    # holds no KV blocks and samples nothing; the runner answers it with a vector.
    pooling: PoolingParams | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    # A ``batching.structured.GrammarMatcher`` when the output is constrained, or
    # a ``batching.thinking.ThinkingGate`` (around one or none) for a thinking model's block.
    grammar: Any = None
    # Draft-model speculation: the tokens the draft model proposed, last step,
    # to follow the request's current last token (consumed by the next step).
    draft_token_ids: list[int] = field(default_factory=list)
    # Prefix caching (BlockManager): the chained keys of the request's full
    # blocks, each computed once, and how many of them are registered.
    block_keys: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    num_registered_blocks: int = 0
    # Text (EngineCore), from admission until the request's text is final.
    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopStringMatcher | None = None
    # position -> logprob of that prompt token, until sent with the first delta.
    pending_prompt_logprobs: "dict[int, TokenLogprobs] | None" = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_encoder_tokens(self) -> int:
        return len(self.encoder_token_ids) if self.encoder_token_ids is not None else 0

    @property
    def max_total_tokens(self) -> int:
        """Tokens this request may ever hold in the cache."""
        if self.pooling is not None:
            return self.num_prompt_tokens
        return self.num_prompt_tokens + self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output, without concatenating the two."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

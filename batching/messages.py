"""Plain-data messages between the scheduler, the runner and the engine.

``SchedulerOutput`` goes into ``model_runtime`` (the runner turns it into
tensors); ``RunnerOutput`` comes back. Neither holds a tensor, a Request or
a live object: ints, floats, lists and bytes only (a grammar travels as the
bitmask of the tokens it allows next), so the runner is testable without a
scheduler and the scheduler without a model. The step message is
incremental: a request's constant data and tokens cross once per admission
(``NewRequestData``), then only new tokens and new blocks; the runner keeps
the rest (``batching.runner_state``).
"""

from dataclasses import dataclass, field

from batching.pooling_params import PoolingParams
from batching.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class SpeculationPlan:
    """What a chunk asks of speculative decoding, as one object: the draft
    tokens appended to it for the runner to verify (n-gram lookup, or the
    draft model's proposals of the last step), and how many drafts the
    runner's draft model should propose after this step for the next one.
    The request's blocks cover ``num_slots`` positions beyond its own tokens."""

    draft_token_ids: list[int] = field(default_factory=list)
    num_lookahead_tokens: int = 0

    @property
    def num_slots(self) -> int:
        return len(self.draft_token_ids) + self.num_lookahead_tokens


NO_SPECULATION = SpeculationPlan()  # shared: never mutate its list


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """What the runner keeps about a request, sent once with its first chunk
    after each admission (a first admission or a resume after preemption):
    its constant data and every token it holds so far. Later chunks of the
    request carry only what changed."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None  # banned while min_tokens is not reached
    # Encoder-decoder models: the source, and the blocks for its cross-attention K/V.
    encoder_token_ids: list[int] | None = None
    cross_block_ids: list[int] = field(default_factory=list)
    # A pooling request: its whole prompt is in this one chunk; answer with a ``PooledOutput``.
    pooling: PoolingParams | None = None


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """One request's slice of a step: ``new_token_ids`` at positions
    ``[num_computed_tokens, num_computed_tokens + len(new_token_ids))``.

    Incremental: ``new_request`` (None except on the first chunk after an
    admission) carries the request's constant data and tokens, and
    ``new_block_ids`` the blocks appended to its block table since its last
    chunk (all of them on the first). The runner keeps the rest
    (``batching.runner_state``).
    ``is_sampling`` is true when the chunk reaches the end of the request's
    known tokens, so the last position's logits pick the next token.
    ``grammar_bitmask`` (constrained sampling chunks only; None otherwise)
    is the grammar's allowed-next-token mask, computed on the batching side:
    little-endian int32 words, bit ``t % 32`` of word ``t // 32`` is token t.
    ``speculation`` is the chunk's ``SpeculationPlan`` (``NO_SPECULATION``
    when it does not speculate); its draft tokens are the tail of
    ``new_token_ids``.
    """

    request_id: str
    new_token_ids: list[int]
    num_computed_tokens: int
    new_block_ids: list[int]
    is_sampling: bool
    new_request: NewRequestData | None = None
    grammar_bitmask: bytes | None = None
    speculation: SpeculationPlan = NO_SPECULATION

    @property
    def num_new_tokens(self) -> int:
        return len(self.new_token_ids)

    @property
    def own_token_ids(self) -> list[int]:
        """The request's own tokens in this chunk (``new_token_ids`` less the drafts)."""
        num_drafts = len(self.speculation.draft_token_ids)
        return self.new_token_ids[: len(self.new_token_ids) - num_drafts] if num_drafts else self.new_token_ids

    @property
    def draft_token_ids(self) -> list[int]:
        return self.speculation.draft_token_ids

    @property
    def num_lookahead_tokens(self) -> int:
        return self.speculation.num_lookahead_tokens


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """What runs in one step: prefill chunks and decode tokens, in one list.

    ``preempted_request_ids`` lost their blocks in this schedule and
    ``finished_request_ids`` finished since the last step that ran: the
    runner drops what it kept about both (a preempted request comes back
    with a ``NewRequestData``)."""

    chunks: list[ScheduledChunk]
    num_batched_tokens: int
    preempted_request_ids: list[str]
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Logprob of a sampled token and of the ``top`` alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class SampledToken:
    """The runner's answer for one sampling chunk: with speculation, the
    draft tokens the model agreed with, then its own next token; with a draft
    model, also the drafts it proposes to follow ``token_id``."""

    request_id: str
    token_id: int
    logprobs: TokenLogprobs | None = None
    accepted_draft_ids: list[int] = field(default_factory=list)
    next_draft_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens ``[first_position, first_position + len(logprobs))``
    computed by one prefill chunk (position 0 never has one)."""

    request_id: str
    first_position: int
    logprobs: list[TokenLogprobs]


@dataclass(frozen=True, slots=True)
class PooledOutput:
    """The runner's answer for a pooling request: its pooled vector."""

    request_id: str
    values: list[float]


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """Everything one step produced, in the order of the sampling chunks,
    and one ``PooledOutput`` per pooling chunk."""

    sampled: list[SampledToken]
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    pooled: list[PooledOutput] = field(default_factory=list)

"""``SamplingParams``: how one request picks its next tokens and when it stops.

Validated once at construction; an invalid value raises ``InvalidRequestError``
(HTTP 400) naming the field, so nothing invalid ever reaches the engine loop.
"""

from dataclasses import dataclass, field

from batching.errors import InvalidRequestError
from batching.structured import GuidedDecoding
from batching.thinking import ThinkingSpec

MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0  # OpenAI's limit; the wire schemas take it from here


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise InvalidRequestError(f"{param}: {message}", param=param)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling and stopping options, spelled as vLLM spells them.

    ``temperature == 0`` means greedy. ``top_k == 0`` or ``-1`` disables top-k.
    ``logprobs`` is the number of top alternatives to return per sampled token
    (``None``: no logprobs at all; ``0``: only the chosen token's);
    ``prompt_logprobs`` likewise for every prompt token after the first
    (requests asking for it bypass the prefix cache: they need every logit).
    ``guided`` constrains the output to a grammar (JSON schema, regex,
    choice, Lark); see ``batching.structured``. ``thinking`` (a thinking
    model's block, ``batching.thinking``) makes ``guided`` apply to the
    answer after the block, and closes the block at its budget.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    guided: GuidedDecoding | None = None
    thinking: ThinkingSpec | None = None

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", "must be at least 1")
        _check(0.0 <= self.temperature <= MAX_TEMPERATURE, "temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(self.top_k >= -1, "top_k", "must be -1 (disabled), 0 (disabled) or positive")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"must be in [0, {MAX_LOGPROBS}]",
        )
        _check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
            "prompt_logprobs",
            f"must be in [0, {MAX_LOGPROBS}]",
        )
        _check(all(s for s in self.stop), "stop", "stop strings must not be empty")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative")
        _check(
            all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
            "logit_bias",
            "biases must be in [-100, 100]",
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

"""``RequestOutput``: the delta a request's stream receives after each step."""

from dataclasses import dataclass, field

from batching.messages import TokenLogprobs


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New tokens and text since the last delta, plus running counters.

    ``finish_reason`` is ``stop``, ``length``, ``abort`` or ``error`` on the
    last delta of a request and ``None`` before. ``prompt_logprobs`` (prompt
    positions 1.. in order) arrives once, on the first delta, when asked for. ``stop_reason`` names the
    stop string or stop token id that ended it, if any. ``error`` (with
    ``finish_reason == "error"``) says why the engine ended the request;
    ``error_status`` is the HTTP status the server reports for it (500: a step
    or the engine loop failed; 503: the server is shutting down).
    A pooling request gets one delta: ``pooled``, its vector, and
    ``finish_reason`` ``stop``.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    error_status: int = 500
    queue_time_s: float | None = None
    pooled: list[float] | None = None  # a pooling request's vector, on its one (last) delta

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

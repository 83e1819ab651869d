"""Stopping: when a request is done, and which text it may still show.

Two checks run after every sampled token, on plain data only:

- ``check_token_stop`` looks at the token just appended to
  ``request.output_token_ids`` (EOS, ``stop_token_ids``, ``max_tokens``) and
  returns a ``StopDecision`` or ``None``. It is a pure function.
- ``batching.stop_strings.StopStringMatcher`` sits after the
  ``IncrementalDetokenizer`` and reports a stop string in the text.

The engine finishes the request with the decision's status and copies its
``stop_reason`` into ``Request.stop_reason`` (vLLM's convention: ``None`` for
EOS and length, the token id for a stop token, the string for a stop string).
"""

from dataclasses import dataclass

from batching.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class StopDecision:
    """Why a request stops: its final status and the stop that matched."""

    status: RequestStatus
    stop_reason: int | str | None = None


def check_token_stop(request: Request, token_id: int) -> StopDecision | None:
    """Decide whether ``token_id``, just appended to the output, ends ``request``.

    EOS (unless ``ignore_eos``) and ``stop_token_ids`` count only once the
    output holds at least ``min_tokens`` tokens. EOS and stop tokens take
    precedence over ``max_tokens`` when both apply.
    Returns ``None`` when the request goes on.
    """
    params = request.sampling_params
    num_output_tokens = request.num_output_tokens
    if num_output_tokens < params.min_tokens:
        return None
    if token_id == request.eos_token_id and not params.ignore_eos:
        return StopDecision(RequestStatus.FINISHED_STOPPED)
    if token_id in params.stop_token_ids:
        return StopDecision(RequestStatus.FINISHED_STOPPED, stop_reason=token_id)
    if num_output_tokens >= params.max_tokens:
        return StopDecision(RequestStatus.FINISHED_LENGTH)
    return None

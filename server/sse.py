"""SSE framing (sse-starlette): a response stream always ends properly, an
error raised mid-stream becoming a final error event and ``data: [DONE]``;
and the typed-event streams (``event:`` + ``data:`` lines) of the Responses
and Messages APIs, which end with their own last event instead."""

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol

from sse_starlette import EventSourceResponse

from batching.errors import TokenstepError
from batching.outputs import RequestOutput
from server.errors import error_event
from server.settings import Settings
from server.shutdown import sse_grace_period_s

SSE_PING_S = 15
logger = logging.getLogger(__name__)


def sse_response(events: AsyncGenerator[str, None], settings: Settings) -> EventSourceResponse:
    """Stream ``events`` as SSE; an error raised mid-stream becomes a final
    error event and ``data: [DONE]``, so a stream always ends properly."""
    return EventSourceResponse(_ending_properly(events), sep="\n", ping=SSE_PING_S, shutdown_grace_period=sse_grace_period_s(settings))


async def _ending_properly(events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    except TokenstepError as exc:
        yield error_event(exc.message, exc.http_status)
        yield "[DONE]"
    except Exception:
        logger.exception("a response stream failed")
        yield error_event("internal server error", 500)
        yield "[DONE]"
    finally:
        await events.aclose()


class EventBuilder(Protocol):
    """Builds one response's typed events from the engine's deltas."""

    def start(self) -> list[dict[str, Any]]: ...

    def feed(self, output: RequestOutput) -> list[dict[str, Any]]: ...


async def typed_events(
    builder: EventBuilder,
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    error_event: Callable[[TokenstepError], dict[str, Any]],
    finish: Callable[[], object] = lambda: None,
) -> AsyncIterator[dict[str, str]]:
    """SSE events ``event: <type>`` / ``data: <json>`` for one request:
    ``builder``'s start events, then those of each delta, then ``finish()``.
    A failure after the start is ``error_event(exc)``, the stream's last."""
    try:
        for event in builder.start():
            yield _typed(event)
        async for _, output in outputs:
            for event in builder.feed(output):
                yield _typed(event)
        finish()
    except TokenstepError as exc:
        yield _typed(error_event(exc))
    finally:
        await outputs.aclose()


def _typed(event: dict[str, Any]) -> dict[str, str]:
    return {"event": event["type"], "data": json.dumps(event)}

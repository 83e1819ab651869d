"""SSE framing (sse-starlette): a response stream always ends properly, an
error raised mid-stream becoming a final error event and ``data: [DONE]``."""

import logging
from collections.abc import AsyncGenerator, AsyncIterator

from sse_starlette import EventSourceResponse

from batching.errors import TokenstepError
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

"""``X-Request-Id`` on every response, and one log line per HTTP request.

The id is the client's own ``X-Request-Id`` when it sent one (so a proxy's or
a caller's trace id survives), else the id the route gave the request (the
``chatcmpl-...``, ``cmpl-...`` or ``resp_...`` of its body, set on
``request.state.request_id``), else a fresh one. The same id starts the
access line logged when the response ends (uvicorn's own access log is off):
``request_id=... POST /v1/chat/completions 200 0.512s`` (at DEBUG for
``/health`` and ``/metrics``, which probes and scrapers call every few seconds).
"""

import logging
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("tokenstep.access")
HEADER = "x-request-id"
MAX_CLIENT_ID_LEN = 256  # a longer client id is replaced, not echoed
QUIET_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapes: logged at DEBUG only


def client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == HEADER.encode():
            text = value.decode("latin-1").strip()
            return text if 0 < len(text) <= MAX_CLIENT_ID_LEN and text.isprintable() else None
    return None


def request_id_of(scope: Scope) -> str:
    """The id this HTTP request is known by (see the module docstring)."""
    state = scope.setdefault("state", {})
    given = client_request_id(scope)
    if given is not None:
        return given
    if "request_id" not in state:
        state["request_id"] = uuid.uuid4().hex
    return state["request_id"]


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})
        started = time.monotonic()
        status: list[int] = []

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                MutableHeaders(scope=message)[HEADER] = request_id_of(scope)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            code = status[0] if status else 500
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            logger.log(
                level,
                "request_id=%s %s %s %d %.3fs",
                request_id_of(scope),
                scope["method"],
                scope["path"],
                code,
                time.monotonic() - started,
            )

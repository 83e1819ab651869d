"""Graceful shutdown: SIGTERM -> stop admitting (503) -> let in-flight requests
finish for up to ``--shutdown-timeout`` -> end the rest with an error -> exit 0.

A model that fails to load ends the process too, with exit status 1 and one
line on stderr saying why (so compose and Kubernetes restart or report it,
rather than probing a ``/health`` that would answer 503 forever).

uvicorn's own shutdown closes the listening socket first and then waits for
open connections, so a drain placed in the lifespan would run too late (after
every stream was waited for or cut). ``DrainingServer`` drains *before*
handing over to uvicorn's shutdown: while it drains, the socket still accepts
connections and new requests get a clear 503 with ``Retry-After`` (and
``/health`` turns 503) instead of a refused connection; in-flight streams run
on and end with their last delta and ``data: [DONE]``, or, past the timeout,
with an error event and ``data: [DONE]``. Only then are the sockets closed and
the lifespan (which stops the engine) shut down.

Two library defaults are overridden on the way:

- sse-starlette cancels every open SSE stream as soon as uvicorn starts
  exiting; each stream is given a grace period longer than the drain instead
  (``sse_grace_period_s``), so streams end on their own terms.
- uvicorn re-raises the SIGTERM it handled once it has stopped, so the process
  would die by the signal (exit status -15). The drain *is* the handling of
  that signal, so the re-raised one lands on a handler that does nothing and
  the process exits 0.
"""

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.settings import Settings

logger = logging.getLogger(__name__)

# After the drain, how long uvicorn may still wait for connections to close
# (the last bytes of responses that already ended) before cancelling them.
CONNECTION_CLOSE_MARGIN_S = 5.0
FORCE_EXIT_POLL_S = 0.1
STARTUP_FAILURE_EXIT_CODE = 3  # what uvicorn.run exits with when the server never started
LOAD_FAILURE_EXIT_CODE = 1


def sse_grace_period_s(settings: Settings) -> float:
    """How long an SSE stream may outlive the start of a shutdown: past the drain."""
    return settings.shutdown_timeout + CONNECTION_CLOSE_MARGIN_S


async def drain(app: FastAPI, timeout_s: float) -> None:
    """Stop admissions and wait for the engine's in-flight requests (see module doc)."""
    served = app.state.served
    if served is None or not served.batcher.is_running:
        return
    logger.info("shutdown: draining in-flight requests (up to %.1f s)", timeout_s)
    num_ended = await served.batcher.drain(timeout_s)
    logger.info("shutdown: drained (%d requests ended early)", num_ended)


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` that drains the engine before closing its sockets."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.shutdown_timeout_s = shutdown_timeout_s

    async def shutdown(self, sockets: list | None = None) -> None:
        draining = asyncio.ensure_future(drain(self.fastapi_app, self.shutdown_timeout_s))
        while not draining.done() and not self.force_exit:
            await asyncio.wait({draining}, timeout=FORCE_EXIT_POLL_S)
        if not draining.done():  # a second Ctrl-C: end what is left now
            await drain(self.fastapi_app, 0.0)
            await draining
        await super().shutdown(sockets)


def run_until_drained(app: FastAPI, settings: Settings) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then drain and return (exit 0)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=CONNECTION_CLOSE_MARGIN_S,
    )
    server = DrainingServer(config, app, settings.shutdown_timeout)

    def after_uvicorn(signum: int, frame: FrameType | None) -> None:
        # Reached only for a SIGTERM uvicorn already drained on (it re-raises
        # it on exit), or one that arrived before uvicorn installed its handler.
        if not server.should_exit:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, after_uvicorn)
    app.state.on_load_failure = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once drained, as uvicorn.run expects
        pass
    if app.state.load_error is not None:
        print(f"tokenstep: could not load the model: {app.state.load_error}", file=sys.stderr)
        sys.exit(LOAD_FAILURE_EXIT_CODE)
    if not server.started:
        sys.exit(STARTUP_FAILURE_EXIT_CODE)

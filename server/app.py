"""The FastAPI app factory: lifespan (engine start/stop), auth, health,
metrics, the request-size limit, the routers (``/stats`` from
``server.stats``), and the browser pages (``server.pages``: ``/``,
``/dashboard``, their ``/static`` files).

The engine is built by a loader callable run in a worker thread at start-up,
so ``/health`` answers 503 while the model loads and 200 once it serves (and
503 again while draining for shutdown, or if the engine loop died).

Routing is exact: no slash redirects (``/v1/completions/`` is a 404, never a
307 whose ``Location`` echoes the client's Host header), and every ``/v1``,
``/tokenize`` and ``/detokenize`` route checks the API key before its body is
read. CORS is off unless ``--allowed-origins`` names origins.
"""

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.chat import router as chat_router
from server.completions import router as completions_router
from server.embeddings import router as embeddings_router
from server.errors import RETRY_AFTER_NOT_READY_S, AuthError, error_response, install_error_handlers
from server.messages import router as messages_router
from server.metrics import Metrics
from server.models import router as models_router
from server.pages import STATIC_DIR
from server.pages import router as pages_router
from server.request_log import RequestIdMiddleware
from server.response_store import ResponseStore
from server.responses import router as responses_router
from server.scoring import router as scoring_router
from server.settings import Settings
from server.state import Served
from server.stats import router as stats_router
from server.tokenize import router as tokenize_router

logger = logging.getLogger(__name__)


def _check_api_key(request: Request) -> None:
    """The key as OpenAI's clients send it (``Authorization: Bearer``) or as Anthropic's do (``x-api-key``)."""
    expected: str | None = request.app.state.settings.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthError("missing or invalid API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')")


class BodySizeLimit:
    """413 for request bodies over ``max_bytes``, by header or as streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # An HTTPException passes through FastAPI's body parsing
                # unchanged (anything else becomes a generic 400).
                raise StarletteHTTPException(413, f"request body larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body larger than {self.max_bytes} bytes"
        response = error_response(413, message, code="request_too_large", path=scope.get("path", ""))
        await response(scope, receive, send)


def create_app(settings: Settings, load: Callable[[], Served] | None = None, ready: Served | None = None) -> FastAPI:
    """Build the app. Pass ``ready`` (tests) or ``load`` (run at start-up)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = None
        if ready is not None:
            await _start(app, ready)
        elif load is not None:
            loading = asyncio.create_task(_load_and_start(app, load))
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            if app.state.served is not None:
                await app.state.served.batcher.stop()
            if app.state.model_thread is not None:
                app.state.model_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="tokenstep", summary="OpenAI-compatible inference server with continuous batching", lifespan=lifespan, redirect_slashes=False
    )
    app.state.settings = settings
    app.state.served = None
    app.state.model_thread = None
    app.state.load_error = None
    # Called when loading fails (``server.shutdown`` stops the process then, non-zero).
    app.state.on_load_failure = None
    app.state.responses = ResponseStore(settings.max_stored_responses)
    app.state.metrics = Metrics(lambda: app.state.served.batcher if app.state.served else None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    if settings.allowed_origin_list:
        # Added last, so outermost: error responses (413, 401, ...) carry CORS headers too.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-api-key", "anthropic-version", "anthropic-beta"],
        )

    @app.get("/health", summary="200 once the model serves; 503 while loading or if the engine died")
    async def health(request: Request) -> JSONResponse:
        state: Served | None = request.app.state.served
        if state is None or not state.batcher.is_running or state.batcher.is_draining:
            return error_response(
                503, f"not ready: {_not_ready_reason(request.app, state)}", headers={"Retry-After": str(RETRY_AFTER_NOT_READY_S)}
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    api = APIRouter(dependencies=[Depends(_check_api_key)])
    api.include_router(completions_router)
    api.include_router(chat_router)
    api.include_router(embeddings_router)
    api.include_router(scoring_router)
    api.include_router(responses_router)
    api.include_router(messages_router)
    api.include_router(models_router)
    api.include_router(tokenize_router)
    api.include_router(stats_router)
    app.include_router(api)
    app.include_router(pages_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _not_ready_reason(app: FastAPI, state: Served | None) -> str:
    if state is None:
        return app.state.load_error or "loading"
    if state.batcher.is_draining:
        return "shutting down"
    return f"engine stopped ({state.batcher.failure})" if state.batcher.failure else "engine stopped"


async def _start(app: FastAPI, state: Served, model_thread: ThreadPoolExecutor | None = None) -> None:
    await state.batcher.start(model_thread)
    app.state.served = state


async def _load_and_start(app: FastAPI, load: Callable[[], Served]) -> None:
    # Load and step on one thread: all torch compute stays on a single OpenMP pool.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenstep-model")
    app.state.model_thread = model_thread
    try:
        state = await asyncio.get_running_loop().run_in_executor(model_thread, load)
    except Exception as exc:
        logger.debug("loading the model failed", exc_info=True)
        app.state.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ValueError, OSError)) else str(exc)
        logger.error("loading the model failed: %s", app.state.load_error)
        if app.state.on_load_failure is not None:
            app.state.on_load_failure()
        return
    await _start(app, state, model_thread)
    logger.info("serving %s", state.model_name)

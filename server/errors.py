"""Every error class of the HTTP layer, and the one place errors become
OpenAI error JSON: ``{"error": {"message", "type", "param", "code"}}``, or,
on Anthropic's routes (``/v1/messages...``), Anthropic's:
``{"type": "error", "error": {"type", "message"}}``.

Domain errors (``batching.errors.TokenstepError`` and the subclasses here)
carry their status, type, param and code; FastAPI's 422 and malformed JSON
become 400; unknown routes 404; anything unexpected a 500 with no stack
trace in the body (it goes to the log). ``error_body`` builds the envelope
for JSON responses and for SSE error events alike.
"""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from batching.errors import InvalidRequestError, TokenstepError
from batching.outputs import RequestOutput
from server.request_log import request_id_of

logger = logging.getLogger(__name__)


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready: normal, not
    an error. Its requests are already aborted; the handler logs one INFO
    line and answers 499 (nginx's "client closed request") to nobody."""


class AuthError(TokenstepError):
    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFoundError(InvalidRequestError):
    http_status = 404
    error_type = "not_found_error"
    code = "model_not_found"


class ResponseNotFoundError(InvalidRequestError):
    """An unknown, deleted or evicted ``/v1/responses`` id."""

    http_status = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


class EngineFailedError(TokenstepError):
    """The engine ended an admitted request with an error (500; 503 when shutting down)."""

    http_status = 500
    error_type = "server_error"


class RequestTimeoutError(TokenstepError):
    """The request ran longer than ``--request-timeout`` (HTTP 504)."""

    http_status = 504
    error_type = "server_error"
    code = "request_timeout"


def output_error(output: RequestOutput) -> EngineFailedError:
    """The exception for an error delta, with the status the engine chose."""
    error = EngineFailedError(output.error or "the engine failed this request")
    error.http_status = output.error_status
    return error


CLIENT_CLOSED_REQUEST = 499
# Retry-After on 503s, in seconds: the one place both values live. Busy (queue
# full, shutting down, engine stopped) is worth a retry at once, elsewhere or
# here; not ready (/health while the model loads) takes seconds to change.
RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_NOT_READY_S = 5
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


ANTHROPIC_PATH_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict:
    """Anthropic's error envelope (also its stream's ``error`` event); the type follows the status."""
    error_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_type_for(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, error_type: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error envelope (``type`` from the status unless given)."""
    return {"error": {"message": message, "type": error_type or error_type_for(status), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    error_type: str | None = None,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
    path: str = "",
) -> JSONResponse:
    """The error as JSON in the shape of the API ``path`` belongs to (OpenAI's unless Anthropic's)."""
    if path.startswith(ANTHROPIC_PATH_PREFIX):
        body = anthropic_error_body(status, f"{param}: {message}" if param else message)
    else:
        body = error_body(status, message, param, error_type, code)
    return JSONResponse(body, status_code=status, headers=headers)


def error_event(message: str, status: int = 500) -> str:
    """An SSE ``data`` payload in OpenAI's error shape (code: the HTTP status)."""
    return json.dumps(error_body(status, message, code=status))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    return f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}", param


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    """The router's bare "Not Found" / "Method Not Allowed" named: which
    route, and that tokenstep does not serve it (a client calling
    ``/v1/embeddings`` learns the server lacks it, not that a path is mistyped)."""
    route = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"{route} is not a route tokenstep serves (docs/API.md lists the routes)"
    if exc.status_code == 405 and exc.detail == "Method Not Allowed":
        return f"{route}: tokenstep serves {request.url.path} with another method ({exc.headers.get('Allow', '') if exc.headers else ''})"
    return str(exc.detail)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TokenstepError)
    async def _domain(request: Request, exc: TokenstepError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_BUSY_S)} if exc.http_status == 503 else None
        return error_response(exc.http_status, exc.message, exc.param, exc.error_type, exc.code, headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if exc.status_code == 413 else None
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, _http_message(request, exc), code=code, headers=headers, path=request.url.path)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, _: ClientDisconnected) -> Response:
        logger.info("request_id=%s client disconnected from %s; its requests were aborted", request_id_of(request.scope), request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request_id=%s unhandled error on %s %s", request_id_of(request.scope), request.method, request.url.path)
        return error_response(500, "internal server error", code=None, path=request.url.path)

"""Domain errors raised before a request reaches the engine loop.

The server maps every ``TokenstepError`` subclass to an OpenAI-style error
body in one place; ``http_status`` says which status code it becomes.
"""


class TokenstepError(Exception):
    """Base of every error a client can cause or observe."""

    http_status: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(TokenstepError):
    """The request is malformed or asks for something impossible (HTTP 400)."""

    http_status = 400
    error_type = "invalid_request_error"


class EngineUnavailableError(TokenstepError):
    """The engine cannot take the request now (HTTP 503, with Retry-After)."""

    http_status = 503
    error_type = "server_error"


class QueueFullError(EngineUnavailableError):
    """Too many requests are already waiting (``--max-queue-len``): HTTP 503."""

    code = "queue_full"


class ShuttingDownError(EngineUnavailableError):
    """The server is draining for shutdown and admits nothing new: HTTP 503."""

    code = "shutting_down"

"""A streaming ASGI transport for httpx, for tests that must see SSE events
as they are sent and hang up mid-stream.

``httpx.ASGITransport`` runs the app to completion and buffers the whole body
before returning, so a client can neither read the first event of a long
stream early nor disconnect. This transport runs the app in a task, hands body
chunks to the response stream as the app sends them, and on ``aclose()``
answers the app's next ``receive()`` with ``http.disconnect``, which is what a
real server does when the peer closes the socket. Cancelling a request that
is still waiting for its response start hangs up the same way.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx


class _AppStream(httpx.AsyncByteStream):
    def __init__(self, chunks: "asyncio.Queue[bytes | None]", disconnect: asyncio.Event, task: asyncio.Task) -> None:
        self._chunks = chunks
        self._disconnect = disconnect
        self._task = task

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._chunks.get()
            if chunk is None:
                return
            yield chunk

    async def aclose(self) -> None:
        self._disconnect.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class StreamingASGITransport(httpx.AsyncBaseTransport):
    def __init__(self, app: Any) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for (k, v) in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
        }
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        disconnect = asyncio.Event()
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        request_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if disconnect.is_set():
                raise OSError("client disconnected")
            if message["type"] == "http.response.start":
                started.set_result(message)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                if not started.done():
                    started.set_exception(exc)
            finally:
                chunks.put_nowait(None)
                if not started.done():
                    started.set_exception(RuntimeError("the app sent no response"))

        task = asyncio.create_task(run())
        try:
            start = await started
        except asyncio.CancelledError:
            # The caller gave up before the response began (a cancelled
            # non-streaming request): hang up, as a closed socket would.
            disconnect.set()
            raise
        headers = [(bytes(k), bytes(v)) for k, v in start.get("headers", [])]
        return httpx.Response(start["status"], headers=headers, stream=_AppStream(chunks, disconnect, task))

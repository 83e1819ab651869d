"""HTTP to the server under test: a start-up probe and one timed streaming request.

``probe_server`` (sync, before the run) asks ``GET /v1/models`` for the model
id and ``POST /tokenize`` for the ids of ``datasets.SAMPLE_TEXT``; either may
be missing on a given server, which only changes how prompts are built.

``send_request`` (async, the hot path) posts one streaming request
(``stream: true``, ``stream_options.include_usage: true``) and times every
SSE ``data:`` line as it arrives. A *content chunk* is one whose first choice
carries non-empty text (``text`` for completions, ``delta.content`` or
reasoning for chat); role-only and finish-only chunks are not tokens, so they
are not timed. Output tokens come from the final usage chunk when the server
sends one, else one per content chunk. Every failure (HTTP status, connection
error, ``{"error": ...}`` event, malformed SSE, no content) becomes
``RequestResult.error``; nothing is raised except cancellation.

The ``embeddings`` endpoint posts one input per request to
``/v1/embeddings`` (JSON, not a stream): its latency is both its TTFT and
its end-to-end time, its input tokens are the server's ``usage``, and it
has no output tokens (throughput is input tokens per second).
"""

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.datasets import DEFAULT_TOKENS_PER_WORD, SAMPLE_TEXT, BenchPrompt
from bench.stats import RequestResult

PROBE_TIMEOUT_S = 10.0
ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "embeddings": "/v1/embeddings"}
DONE_MARKER = "[DONE]"


@dataclass(frozen=True)
class Target:
    """Where and how requests go; ``base_url`` is the server root (no ``/v1``)."""

    base_url: str
    endpoint: str
    model: str | None
    api_key: str | None = None
    ignore_eos: bool = False

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINT_PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class ServerProbe:
    """What the probe learnt: model id, sample token ids, tokens per word."""

    model: str | None
    vocab_ids: list[int]
    tokens_per_word: float
    notes: tuple[str, ...]


def server_root(base_url: str) -> str:
    """``http://h:8000/v1/`` → ``http://h:8000``: routes are added per endpoint."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def probe_server(base_url: str, model: str | None, api_key: str | None) -> ServerProbe:
    """Model id (first of ``/v1/models`` unless given) and sample token ids."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    notes: list[str] = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=PROBE_TIMEOUT_S) as client:
        if model is None:
            model = _first_model(client, notes)
        vocab_ids = _sample_token_ids(client, model, notes)
    tokens_per_word = len(vocab_ids) / len(SAMPLE_TEXT.split()) if vocab_ids else DEFAULT_TOKENS_PER_WORD
    return ServerProbe(model, sorted(set(vocab_ids)), tokens_per_word, tuple(notes))


def _first_model(client: httpx.Client, notes: list[str]) -> str | None:
    try:
        response = client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        notes.append(f"GET /v1/models failed ({describe_exception(exc)}); requests carry no model")
        return None


def _sample_token_ids(client: httpx.Client, model: str | None, notes: list[str]) -> list[int]:
    """All ids of ``SAMPLE_TEXT`` in order (with repeats); empty when unsupported."""
    body: dict[str, Any] = {"prompt": SAMPLE_TEXT, "add_special_tokens": False}
    if model is not None:
        body["model"] = model
    try:
        response = client.post("/tokenize", json=body)
        response.raise_for_status()
        tokens = response.json()["tokens"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        notes.append(f"POST /tokenize unavailable ({describe_exception(exc)}); using text prompts")
        return []
    if not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
        notes.append("POST /tokenize returned no usable ids; using text prompts")
        return []
    return tokens


def build_payload(target: Target, prompt: BenchPrompt) -> dict[str, Any]:
    """The JSON body of one streaming request asking for ``prompt.output_len``
    tokens (for ``embeddings``, of one request embedding the prompt)."""
    if target.endpoint == "embeddings":
        payload = {"input": prompt.prompt, "encoding_format": "float"}
        return payload | ({"model": target.model} if target.model is not None else {}) | (prompt.extra_body or {})
    payload: dict[str, Any] = {
        "max_tokens": prompt.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.model is not None:
        payload["model"] = target.model
    if target.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt.prompt}]
    else:
        payload["prompt"] = prompt.prompt
    if target.ignore_eos:
        payload["ignore_eos"] = True
    if prompt.extra_body:
        payload.update(prompt.extra_body)
    return payload


def describe_exception(exc: BaseException) -> str:
    """``"ConnectError: [Errno 111] Connection refused"``; the type when no message."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def http_error_message(status_code: int, body: bytes) -> str:
    """``"HTTP 404: <OpenAI error message or body start>"``."""
    text = body.decode("utf-8", errors="replace")
    try:
        text = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return f"HTTP {status_code}: {str(text)[:200]}"


def chunk_text(chunk: dict[str, Any]) -> str:
    """The new text in one completions or chat chunk's first choice ('' if none)."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


def sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; None for comments, events and blanks."""
    if not line.startswith("data:"):
        return None
    return line[len("data:") :].strip()


async def send_request(client: httpx.AsyncClient, target: Target, prompt: BenchPrompt) -> RequestResult:
    """Send one streaming request and time it; failures come back as ``error``."""
    result = RequestResult(input_tokens=prompt.input_len)
    start_s = time.perf_counter()
    if target.endpoint == "embeddings":
        return await _send_embedding(client, target, prompt, result, start_s)
    try:
        async with client.stream("POST", target.url, json=build_payload(target, prompt), headers=target.headers) as response:
            if response.status_code != 200:
                result.error = http_error_message(response.status_code, await response.aread())
                return result
            await _read_stream(response, result, start_s)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        result.is_success = False
        result.error = describe_exception(exc)
    return result


async def _read_stream(response: httpx.Response, result: RequestResult, start_s: float) -> None:
    """Fill ``result`` from the SSE stream (timestamps relative to ``start_s``)."""
    last_content_s: float | None = None
    num_content_chunks = 0
    usage: dict[str, Any] = {}
    async for line in response.aiter_lines():
        data = sse_data(line)
        if data is None or not data:
            continue
        if data == DONE_MARKER:
            break
        now_s = time.perf_counter() - start_s
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError(f"unexpected SSE data: {data[:100]}")
        if chunk.get("error"):
            result.error = _stream_error_message(chunk["error"])
            return
        usage = chunk.get("usage") or usage
        if chunk_text(chunk):
            if last_content_s is None:
                result.ttft_s = now_s
            else:
                result.itls_s.append(now_s - last_content_s)
            last_content_s = now_s
            num_content_chunks += 1
    _finish(result, last_content_s, num_content_chunks, usage)


async def _send_embedding(
    client: httpx.AsyncClient, target: Target, prompt: BenchPrompt, result: RequestResult, start_s: float
) -> RequestResult:
    """One ``/v1/embeddings`` request: a success once its vector arrives."""
    try:
        response = await client.post(target.url, json=build_payload(target, prompt), headers=target.headers)
        elapsed_s = time.perf_counter() - start_s
        if response.status_code != 200:
            result.error = http_error_message(response.status_code, response.content)
            return result
        body = response.json()
        if not body.get("data") or not body["data"][0].get("embedding"):
            result.error = "response without an embedding"
            return result
    except (httpx.HTTPError, OSError, ValueError) as exc:
        result.error = describe_exception(exc)
        return result
    result.is_success = True
    result.ttft_s = result.e2e_s = elapsed_s
    result.input_tokens = (body.get("usage") or {}).get("prompt_tokens") or result.input_tokens
    return result


def _finish(result: RequestResult, last_content_s: float | None, num_content_chunks: int, usage: dict[str, Any]) -> None:
    if last_content_s is None:
        result.error = "stream ended without a content chunk"
        return
    result.is_success = True
    result.e2e_s = last_content_s
    result.output_tokens = usage.get("completion_tokens") or num_content_chunks
    result.input_tokens = usage.get("prompt_tokens") or result.input_tokens


def _stream_error_message(error: Any) -> str:
    if isinstance(error, dict):
        return f"stream error: {error.get('message', error)}"
    return f"stream error: {error}"

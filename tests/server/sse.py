"""Parse a Server-Sent Events body into its ``data`` payloads."""

import json
from typing import Any

DONE = "[DONE]"


def sse_data(body: str) -> list[str]:
    """Return each event's data (multi-line data joined by newlines), in order.

    Comment lines (``: ping``) and other fields are skipped.
    """
    events: list[str] = []
    data: list[str] | None = None
    for line in body.splitlines() + [""]:
        if not line:
            if data is not None:
                events.append("\n".join(data))
            data = None
        elif line.startswith("data:"):
            value = line[5:]
            data = (data or []) + [value[1:] if value.startswith(" ") else value]
    return events


def parse_completion_stream(body: str) -> list[dict[str, Any]]:
    """Check the stream ends with exactly one ``[DONE]`` and every other event
    is a JSON object; return the JSON events."""
    events = sse_data(body)
    assert events, f"no SSE events in {body!r}"
    assert events[-1] == DONE, f"stream does not end with [DONE]: {events[-3:]!r}"
    assert DONE not in events[:-1]
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(isinstance(chunk, dict) for chunk in chunks)
    return chunks


def stream_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])

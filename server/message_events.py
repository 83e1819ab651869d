"""One Messages-API message, built delta by delta, with Anthropic's typed stream events.

``MessageBuilder`` turns the engine's deltas for one request into Anthropic's
content blocks (``thinking`` when the model thinks, ``text``, and one
``tool_use`` per call) and into the events that build them, in Anthropic's
order::

    message_start
    (per block: content_block_start, content_block_delta ..., content_block_stop)
    message_delta  (stop_reason, stop_sequence, usage.output_tokens)
    message_stop

A thinking or text block opens at its first text and closes when another
kind of block follows or at the end (a ``thinking`` block's ``signature`` is
empty: nothing here verifies one);
a ``tool_use`` block's ``input_json_delta`` carries its whole arguments JSON at
once (sent when the call is complete), so the joined ``partial_json`` always
parses. The non-streaming route runs the same builder and returns
``message``. Plain dicts throughout (the wire JSON).
"""

import json
import uuid
from typing import Any

from batching.outputs import RequestOutput
from server.chat import ReplyShape, finish_reason
from server.messages_protocol import response_stop_reason

Event = dict[str, Any]


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


class MessageBuilder:
    """Invariant: ``message["content"]`` holds every block started so far, in
    order; at most one block is open (receiving thinking or text) at a time."""

    def __init__(self, reply: ReplyShape, message_id: str, model_name: str) -> None:
        self._reply = reply
        self._parser = reply.parser()
        self._open: dict[str, Any] | None = None
        self.message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model_name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 0},
        }

    def start(self) -> list[Event]:
        return [{"type": "message_start", "message": json.loads(json.dumps(self.message))}]

    def feed(self, output: RequestOutput) -> list[Event]:
        """The events one engine delta produces (the last one finishes the message)."""
        split = self._parser.feed(output.new_text, output.is_finished)
        events = self._append("thinking", split.reasoning) if split.reasoning else []
        events += self._append("text", split.content) if split.content else []
        for call in split.calls:
            events += self._close() + self._tool_use(call)
        self.message["usage"]["output_tokens"] = output.num_output_tokens
        if output.is_finished:
            events += self._close() + self._finish(output)
        return events

    def _append(self, kind: str, delta: str) -> list[Event]:
        """``delta`` added to the open block of this kind (``thinking`` or ``text``), opened first if need be."""
        events = [] if self._open is not None and self._open["type"] == kind else self._close()
        if self._open is None:
            self._open = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}
            self.message["content"].append(self._open)
            events.append({"type": "content_block_start", "index": self._last_index, "content_block": dict(self._open)})
        self._open[kind] += delta
        events.append({"type": "content_block_delta", "index": self._last_index, "delta": {"type": f"{kind}_delta", kind: delta}})
        return events

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": self._last_index}]

    def _tool_use(self, call: dict[str, Any]) -> list[Event]:
        function = call["function"]
        block = {"type": "tool_use", "id": f"toolu_{call['id'].removeprefix('call_')}", "name": function["name"], "input": {}}
        self.message["content"].append(block)
        index = self._last_index
        events = [{"type": "content_block_start", "index": index, "content_block": dict(block)}]
        block["input"] = _input_object(function["arguments"])
        events.append(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])},
            }
        )
        events.append({"type": "content_block_stop", "index": index})
        return events

    def _finish(self, output: RequestOutput) -> list[Event]:
        calls = [block for block in self.message["content"] if block["type"] == "tool_use"]
        reason = response_stop_reason(finish_reason(output, calls, self._reply.plan), output.stop_reason)
        self.message["stop_reason"] = reason
        self.message["stop_sequence"] = output.stop_reason if reason == "stop_sequence" else None
        delta = {"stop_reason": reason, "stop_sequence": self.message["stop_sequence"]}
        return [
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output.num_output_tokens}},
            {"type": "message_stop"},
        ]

    @property
    def _last_index(self) -> int:
        return len(self.message["content"]) - 1


def _input_object(arguments: str) -> dict[str, Any]:
    """A call's arguments as ``tool_use.input`` (an object; anything else is wrapped, never dropped)."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = arguments
    return parsed if isinstance(parsed, dict) else {"arguments": parsed}

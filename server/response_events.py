"""One Responses-API response, built delta by delta, with its typed events.

``ResponseBuilder`` turns the engine's deltas for one request into OpenAI's
output items (a ``reasoning`` item with one ``reasoning_text`` part when the
model thinks, an assistant ``message`` with one ``output_text`` part, and a
``function_call`` item per tool call) and into the stream events that build
them, in OpenAI's order, each with its ``sequence_number``::

    response.created, response.in_progress,
    (a model's thinking: response.output_item.added, response.content_part.added,
     response.reasoning_text.delta ..., response.reasoning_text.done,
     response.content_part.done, response.output_item.done)
    response.output_item.added, response.content_part.added,
    response.output_text.delta ..., response.output_text.done,
    response.content_part.done, response.output_item.done,
    (per call: response.output_item.added,
     response.function_call_arguments.delta/done, response.output_item.done)
    response.completed  (response.incomplete when max_output_tokens cut it)

The non-streaming route runs the same builder and returns ``response``, so a
streamed and a non-streamed response are built by one piece of code. Plain
dicts throughout (the wire JSON).
"""

import uuid
from typing import Any

from batching.outputs import RequestOutput
from server.chat import ReplyShape, finish_reason

Event = dict[str, Any]


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """Invariant: ``response["output"]`` holds every item added so far, in
    output order; at most one message item is open (receiving text) at a time."""

    def __init__(self, reply: ReplyShape, skeleton: dict[str, Any], want_logprobs: bool) -> None:
        self._reply = reply
        self._parser = reply.parser()
        self._want_logprobs = want_logprobs
        self.response: dict[str, Any] = {**skeleton, "status": "in_progress", "output": [], "usage": None}
        self._sequence_number = 0
        self._open_message: dict[str, Any] | None = None
        self._open_reasoning: dict[str, Any] | None = None
        self.calls: list[dict[str, Any]] = []  # chat-shaped tool calls, for the stored conversation

    @property
    def text(self) -> str:
        """The output text of every message item, joined."""
        return "".join(part["text"] for item in self.response["output"] if item["type"] == "message" for part in item["content"])

    def start(self) -> list[Event]:
        return [self._event("response.created", response=self._snapshot()), self._event("response.in_progress", response=self._snapshot())]

    def feed(self, output: RequestOutput) -> list[Event]:
        """The events one engine delta produces (the last one finishes the response)."""
        split = self._parser.feed(output.new_text, output.is_finished)
        content, calls = split.content, split.calls
        logprobs = (
            [entry.model_dump(mode="json") for entry in self._reply.logprobs(output.logprobs).content]
            if self._want_logprobs and output.logprobs
            else []
        )
        events = self._reasoning(split.reasoning) if split.reasoning else []
        if content or logprobs:
            events += self._close_reasoning() + self._text(content, logprobs)
        for call in calls:
            events += self._close_reasoning() + self._close_message() + self._function_call(call)
        if output.is_finished and self._parser.cut_call:  # a forced call cut short: shown, as OpenAI does
            events += self._close_reasoning() + self._close_message() + self._function_call(self._parser.cut_call, "incomplete")
        if output.is_finished:
            events += self._close_reasoning() + self._finish(output)
        return events

    def _reasoning(self, delta: str) -> list[Event]:
        events = []
        if self._open_reasoning is None:
            item = {"id": new_item_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
            self.response["output"].append(item)
            self._open_reasoning = item
            events.append(self._event("response.output_item.added", output_index=self._index_of(item), item=_copy(item)))
            item["content"].append({"type": "reasoning_text", "text": ""})
            events.append(self._part_event("response.content_part.added", item))
        item = self._open_reasoning
        item["content"][0]["text"] += delta
        events.append(
            self._event(
                "response.reasoning_text.delta", item_id=item["id"], output_index=self._index_of(item), content_index=0, delta=delta
            )
        )
        return events

    def _close_reasoning(self) -> list[Event]:
        item, self._open_reasoning = self._open_reasoning, None
        if item is None:
            return []
        item["status"] = "completed"
        index, part = self._index_of(item), item["content"][0]
        return [
            self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0, text=part["text"]),
            self._part_event("response.content_part.done", item),
            self._event("response.output_item.done", output_index=index, item=_copy(item)),
        ]

    def _part_event(self, kind: str, item: dict[str, Any]) -> Event:
        return self._event(kind, item_id=item["id"], output_index=self._index_of(item), content_index=0, part=_copy(item["content"][0]))

    def _text(self, delta: str, logprobs: list[dict[str, Any]]) -> list[Event]:
        events = [] if self._open_message is not None else self._open_new_message()
        message = self._open_message
        part = message["content"][0]
        part["text"] += delta
        part["logprobs"].extend(logprobs)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=message["id"],
                output_index=self._index_of(message),
                content_index=0,
                delta=delta,
                logprobs=logprobs,
            )
        )
        return events

    def _open_new_message(self) -> list[Event]:
        message = {"id": new_item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        self.response["output"].append(message)
        self._open_message = message
        index = self._index_of(message)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        added = self._event("response.output_item.added", output_index=index, item=_copy(message))
        message["content"].append(part)
        return [
            added,
            self._event(
                "response.content_part.added", item_id=message["id"], output_index=index, content_index=0, part=dict(part, logprobs=[])
            ),
        ]

    def _close_message(self, status: str = "completed") -> list[Event]:
        message, self._open_message = self._open_message, None
        if message is None:
            return []
        message["status"] = status
        index, part = self._index_of(message), message["content"][0]
        return [
            self._event(
                "response.output_text.done",
                item_id=message["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=part["logprobs"],
            ),
            self._event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0, part=_copy(part)),
            self._event("response.output_item.done", output_index=index, item=_copy(message)),
        ]

    def _function_call(self, call: dict[str, Any], status: str = "completed") -> list[Event]:
        """A call's item; only a completed one joins the stored conversation."""
        function = call["function"]
        item = {
            "id": new_item_id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call["id"],
            "name": function["name"],
            "arguments": "",
        }
        self.response["output"].append(item)
        if status == "completed":
            self.calls.append(call)
        index = self._index_of(item)
        events = [self._event("response.output_item.added", output_index=index, item=_copy(item))]
        item["arguments"], item["status"] = function["arguments"], status
        events.append(
            self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"])
        )
        events.append(
            self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            )
        )
        events.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
        return events

    def _finish(self, output: RequestOutput) -> list[Event]:
        is_cut = finish_reason(output, self.calls, self._reply.plan) == "length"
        # Always one message item, even if empty (a response of reasoning alone included).
        has_answer = any(item["type"] != "reasoning" for item in self.response["output"])
        events = [] if has_answer else self._open_new_message()
        events += self._close_message("incomplete" if is_cut else "completed")
        self.response["status"] = "incomplete" if is_cut else "completed"
        self.response["incomplete_details"] = {"reason": "max_output_tokens"} if is_cut else None
        input_tokens, output_tokens = self._reply.prompt_tokens, output.num_output_tokens
        self.response["usage"] = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": output.num_cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": self._reply.reasoning_tokens(self._parser.reasoning)},
            "total_tokens": input_tokens + output_tokens,
        }
        events.append(self._event("response.incomplete" if is_cut else "response.completed", response=self._snapshot()))
        return events

    def error_event(self, code: str, message: str, param: str | None) -> Event:
        """OpenAI's stream ``error`` event, for a failure after the stream began."""
        return self._event("error", code=code, message=message, param=param)

    def _index_of(self, item: dict[str, Any]) -> int:
        return next(i for i, candidate in enumerate(self.response["output"]) if candidate is item)

    def _snapshot(self) -> dict[str, Any]:
        return _copy(self.response)

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence_number, **fields}
        self._sequence_number += 1
        return event


def _copy(value: Any) -> Any:
    """A deep copy of plain JSON data (events must not change after they are sent)."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value

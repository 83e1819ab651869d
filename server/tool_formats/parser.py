"""The incremental tool-call parser: one choice's text, delta by delta, into
content and complete calls, for any ``ToolFormat``.

``feed`` returns ``(content, calls)`` ready to send. Content never holds a
(partial) open tag, and trailing whitespace (around calls, at the end) is
held back and dropped. A call is sent only once it is complete (its close
tag arrived, or the output ended) and parsed: its arguments string is whole
JSON, never a fragment. A call that does not parse stays content; a call the
model did not close is still parsed at the end if it is complete; otherwise
(output cut by ``max_tokens``) it is content, or dropped when
``keep_partial`` is False (forced calls, where the text can only be calls).
A forced output cut before its first call completed keeps that call as
``cut_call``: the function's name and the arguments written so far, which
the routes return with ``finish_reason: length`` as OpenAI does, so a client
reading the arguments fails loudly instead of getting nothing.
"""

import json
from typing import Any

from server.tool_formats.base import Function, ToolFormat


def new_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def partial_tag_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could start one of ``tags``
    (held back until the next delta says what it is; the reasoning and
    harmony parsers use it too)."""
    for length in range(min(len(text), max(len(tag) for tag in tags) - 1), 0, -1):
        if any(tag.startswith(text[-length:]) and len(tag) > length for tag in tags):
            return length
    return 0


class ToolCallParser:
    def __init__(self, tool_format: ToolFormat, functions: list[Function], keep_partial: bool = True) -> None:
        self._format = tool_format
        self._functions = {f.name: f for f in functions}
        self._keep_partial = keep_partial
        self._pending = ""
        self._open_tag: str | None = None  # set while inside calls
        self._is_undecided = tool_format.only_at_start  # the output's start is not yet known to be calls or content
        self._held_whitespace = ""
        self.calls: list[dict[str, Any]] = []
        self.cut_call: dict[str, Any] | None = None

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._pending += text
        content, calls = "", []
        while self._pending:
            if self._is_undecided:
                if not self._decide_start():
                    break
            elif self._open_tag is not None:
                close = self._format.close_tag
                end = self._pending.find(close) if close is not None else -1
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(close) :]
                found, text_back = self._calls_in(body)
                content += self._content(text_back)
                calls += found
            elif self._format.only_at_start:
                content, self._pending = content + self._content(self._pending), ""
            else:
                start, tag = self._first_open_tag()
                if tag is None:
                    keep = partial_tag_suffix(self._pending, self._format.open_tags)
                    ready, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
                    content += self._content(ready)
                    break
                content += self._content(self._pending[:start])
                self._pending, self._open_tag = self._pending[start + len(tag) :], tag
        self.calls.extend(calls)
        return content, calls

    def feed_delta(self, text: str, is_last: bool) -> tuple[str, list[dict[str, Any]]]:
        """``feed`` one delta; with the last one, ``finish`` too (both results joined)."""
        content, calls = self.feed(text)
        if is_last:
            rest, last_calls = self.finish()
            content, calls = content + rest, calls + last_calls
        return content, calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        if self._is_undecided:  # the whole output was whitespace or the beginning of a tag
            self._is_undecided = False
            if not self._pending.strip():
                return "", []
            self._enter_if_open_tag()
        rest, self._pending = self._pending, ""
        if self._open_tag is None:
            return self._content(rest), []
        found, text_back = self._calls_in(rest, is_cut=True)
        self.calls.extend(found)
        return self._content(text_back), found

    def _decide_start(self) -> bool:
        """For formats whose calls are the whole output: are these calls? False: wait for more text."""
        stripped = self._pending.lstrip()
        if not stripped or any(tag.startswith(stripped) and tag != stripped for tag in self._format.open_tags):
            return False
        self._is_undecided = False
        self._enter_if_open_tag()
        return True

    def _enter_if_open_tag(self) -> None:
        stripped = self._pending.lstrip()
        tag = next((tag for tag in self._format.open_tags if stripped.startswith(tag)), None)
        if tag is not None:
            self._pending, self._open_tag = stripped[len(tag) :], tag

    def _first_open_tag(self) -> tuple[int, str | None]:
        found = [(self._pending.find(tag), tag) for tag in self._format.open_tags if tag in self._pending]
        return min(found) if found else (-1, None)

    def _calls_in(self, body: str, is_cut: bool = False) -> tuple[list[dict[str, Any]], str]:
        """The calls in one body, and the text to show as content instead when it is not calls."""
        tag, self._open_tag = self._open_tag, None
        parsed = self._format.parse(tag, body, self._functions)
        if parsed is not None:
            self._held_whitespace = ""
            return [new_call(self._format.new_call_id(), name, arguments) for name, arguments in parsed], ""
        if is_cut and not self._keep_partial:
            if not self.calls:
                self.cut_call = new_call(self._format.new_call_id(), self._named_in(body), self._format.cut_arguments(body))
            return [], ""
        return [], tag + body + ("" if is_cut or self._format.close_tag is None else self._format.close_tag)

    def _named_in(self, body: str) -> str:
        """The function a cut call names: the only one there is, or the first whose name the text holds."""
        if len(self._functions) == 1:
            return next(iter(self._functions))
        found = [(body.find(name), name) for name in self._functions if name in body]
        return min(found)[1] if found else ""

    def _content(self, text: str) -> str:
        """Trailing whitespace is held back until real content follows it, so
        whitespace around calls (and at the very end) never reaches the client,
        however the text was split into deltas."""
        text = self._held_whitespace + text
        ready = text.rstrip()
        self._held_whitespace = text[len(ready) :]
        return ready

"""gpt-oss's harmony output, split delta by delta into reasoning, content
and tool calls (``server.tool_formats.harmony`` says what the format is).

The text is read with special tokens kept. Each message is a header (up to
``<|message|>``: the channel, and a recipient for a call) and a body (up to
``<|end|>``, ``<|call|>``, ``<|return|>`` or the end of the output):
``analysis`` bodies stream as reasoning, ``final`` bodies and preambles
(``commentary`` to nobody) as content, and a body addressed to
``functions.NAME`` becomes one call once it is complete. A possible marker
at the end of a delta is held back until the next delta says what it is.
It offers what ``server.output_parser.OutputParser`` offers.
"""

from typing import Any

from server.output_parser import OutputDelta
from server.tool_formats import Function, new_call
from server.tool_formats.harmony import CALL, CHANNEL, END, MARKERS, MESSAGE, RETURN, HarmonyFormat
from server.tool_formats.parser import partial_tag_suffix

_BODY_ENDS = (END, CALL, RETURN)


class HarmonyParser:
    def __init__(self, tool_format: HarmonyFormat, functions: list[Function], parses_calls: bool, keep_partial: bool = True) -> None:
        self._format = tool_format
        self._functions = {f.name: f for f in functions}
        self._parses_calls = parses_calls
        self._keep_partial = keep_partial
        self._pending = ""
        self._header: str | None = None  # the open message's header, once read (None: reading one)
        self.calls: list[dict[str, Any]] = []
        self.cut_call: dict[str, Any] | None = None
        self.reasoning = ""

    @property
    def splits(self) -> bool:
        return True

    def feed(self, text: str, is_last: bool) -> OutputDelta:
        self._pending += text
        reasoning, content, calls = "", "", []
        while self._pending:
            if self._header is None:
                end = self._pending.find(MESSAGE)
                if end < 0:
                    if is_last:  # a header the output never finished; text with no marker at all is content
                        content += self._pending if "<|" not in self._pending and not self.calls else ""
                        self._pending = ""
                    break
                self._header, self._pending = self._pending[:end], self._pending[end + len(MESSAGE) :]
                continue
            ends = [(self._pending.find(marker), marker) for marker in _BODY_ENDS if marker in self._pending]
            if ends:
                position, marker = min(ends)
                body, self._pending = self._pending[:position], self._pending[position + len(marker) :]
                is_complete = True
            elif is_last or not self._is_call():  # a call is read whole; other text is sent as it comes
                keep = 0 if is_last else partial_tag_suffix(self._pending, MARKERS)
                body, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
                is_complete = is_last
            else:
                break
            r, c, found = self._body(body, is_complete)
            reasoning, content, calls = reasoning + r, content + c, calls + found
            if not is_complete:
                break
            self._header = None
        self.reasoning += reasoning
        self.calls.extend(calls)
        return OutputDelta(reasoning, content, calls)

    def _is_call(self) -> bool:
        return self._parses_calls and "to=functions." in (self._header or "")

    def _body(self, body: str, is_complete: bool) -> tuple[str, str, list[dict[str, Any]]]:
        """One message body (or the part of it that arrived): reasoning, content or a call."""
        header = self._header or ""
        if not self._is_call():
            return (body, "", []) if "analysis" in header else ("", body, [])
        parsed = self._format.parse(CHANNEL, header + MESSAGE + body, self._functions)
        if parsed is not None:
            return "", "", [new_call(self._format.new_call_id(), name, arguments) for name, arguments in parsed]
        if self._keep_partial:
            return "", body, []
        if not self.calls and self.cut_call is None:  # a forced call cut short: shown as written so far
            self.cut_call = new_call(self._format.new_call_id(), _recipient_name(header), body)
        return "", "", []


def _recipient_name(header: str) -> str:
    marker = "to=functions."
    return header.split(marker, 1)[1].split()[0].split("<")[0] if marker in header else ""

"""One choice's text -> reasoning, answer content and tool calls, delta by delta.

The reasoning parser (``server.reasoning``) goes first, as in vLLM: only the
answer after the thinking block is searched for tool calls
(``server.tool_formats.ToolCallParser``). Either part may be absent (a model that
does not think, a request without tools); with neither, text passes through
as content.
"""

from dataclasses import dataclass, field
from typing import Any

from server.reasoning import ReasoningParser
from server.tool_formats import ToolCallParser


@dataclass(frozen=True, slots=True)
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)


class OutputParser:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None) -> None:
        self._reasoning = reasoning
        self._tools = tools

    @property
    def splits(self) -> bool:
        """Anything may be split out of the text (else it is all content)."""
        return self._reasoning is not None or self._tools is not None

    @property
    def calls(self) -> list[dict[str, Any]]:
        """Every complete call so far."""
        return self._tools.calls if self._tools is not None else []

    @property
    def cut_call(self) -> dict[str, Any] | None:
        """A forced call cut short before any call completed (its arguments are not valid JSON)."""
        return self._tools.cut_call if self._tools is not None else None

    @property
    def reasoning(self) -> str:
        """All the reasoning text so far."""
        return self._reasoning.reasoning if self._reasoning is not None else ""

    def feed(self, text: str, is_last: bool) -> OutputDelta:
        reasoning, content, calls = "", text, []
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(text, is_last)
        if self._tools is not None:
            content, calls = self._tools.feed_delta(content, is_last)
        return OutputDelta(reasoning, content, calls)

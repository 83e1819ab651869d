"""Reasoning output: the model's thinking split from its answer.

Models that think in a tagged block (Qwen3, DeepSeek-R1 and its distills,
QwQ, and any template that opens a ``<think>`` block itself) write::

    <think>
    ...reasoning...
    </think>

    answer

``ReasoningParser`` splits one choice's text, delta by delta, into reasoning
and content (the content then goes on to the tool-call parser). The block
counts only at the very start of the output, or from the start when the
rendered prompt already opened it (DeepSeek-R1's template ends in
``<think>\\n``; Qwen3's with ``enable_thinking: false`` closes an empty
block itself, so its output is all answer). Whitespace around the block is
dropped; a partial tag at the end of a delta is held back until the next
delta says what it is.

Which format applies comes from the model: ``--reasoning-parser auto`` (the
default) picks ``think`` when the chat template handles ``</think>``, else
none; ``think`` (vLLM's names ``deepseek_r1`` and ``qwen3`` too) forces it
and ``none`` turns it off.
"""

from dataclasses import dataclass
from typing import Any

from server.tool_formats.parser import partial_tag_suffix

REASONING_PARSERS = ("auto", "none", "think", "deepseek_r1", "qwen3")
NO_REASONING = "the served model has no reasoning parser (it does not think in <think> blocks; see --reasoning-parser)"


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    start_tag: str = "<think>"
    end_tag: str = "</think>"

    def is_open_at_end(self, prompt_text: str) -> bool:
        """The rendered prompt leaves a block open: the output starts in reasoning."""
        return prompt_text.rfind(self.start_tag) > prompt_text.rfind(self.end_tag)


def reasoning_format(parser_name: str, chat_template: str | None) -> ReasoningFormat | None:
    """The served model's reasoning format (None: its output is all answer)."""
    think = ReasoningFormat()
    if parser_name == "none" or (parser_name == "auto" and think.end_tag not in (chat_template or "")):
        return None
    return think


def effort_template_kwargs(effort: str) -> dict[str, Any]:
    """A request's reasoning effort for the chat template: templates that take
    it (gpt-oss's) read ``reasoning_effort`` as is; ``none`` also turns
    ``enable_thinking`` off (Qwen3's switch)."""
    kwargs: dict[str, Any] = {"reasoning_effort": effort}
    if effort == "none":
        kwargs["enable_thinking"] = False
    return kwargs


class ReasoningParser:
    """Splits one choice's text into ``(reasoning, content)`` deltas.

    States: before the output starts (whitespace, then maybe the start tag),
    in reasoning (until the end tag), in content (for good).
    """

    def __init__(self, reasoning_format: ReasoningFormat, is_open_at_start: bool) -> None:
        self._format = reasoning_format
        self._state = "reasoning" if is_open_at_start else "start"
        self._pending = ""
        self._held_whitespace = ""  # trailing whitespace of the reasoning, sent only if more reasoning follows
        self._has_reasoning_text = False
        self.reasoning = ""

    def feed(self, text: str, is_last: bool) -> tuple[str, str]:
        self._pending += text
        reasoning, content = "", ""
        while self._pending:
            if self._state == "start":
                stripped = self._pending.lstrip()
                if not stripped or (self._format.start_tag.startswith(stripped) and not is_last):
                    break  # whitespace so far, or the start tag's beginning: wait
                if stripped.startswith(self._format.start_tag):
                    self._pending, self._state = stripped[len(self._format.start_tag) :], "reasoning"
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = self._pending.find(self._format.end_tag)
                if end >= 0:
                    reasoning += self._reasoning_text(self._pending[:end], is_final=True)
                    self._pending, self._state = self._pending[end + len(self._format.end_tag) :].lstrip(), "after"
                    continue
                keep = 0 if is_last else partial_tag_suffix(self._pending, (self._format.end_tag,))
                ready, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
                reasoning += self._reasoning_text(ready, is_final=is_last)
                break
            elif self._state == "after":  # whitespace right after the block is dropped, even across deltas
                self._pending = self._pending.lstrip()
                if self._pending:
                    self._state = "content"
            else:
                content, self._pending = content + self._pending, ""
        self.reasoning += reasoning
        return reasoning, content

    def _reasoning_text(self, text: str, is_final: bool) -> str:
        """Leading whitespace of the block and trailing whitespace before its end are dropped."""
        text = self._held_whitespace + text
        if not self._has_reasoning_text:
            text = text.lstrip()
        ready = text if not text else text.rstrip()
        self._held_whitespace = "" if is_final else text[len(ready) :]
        self._has_reasoning_text = self._has_reasoning_text or bool(ready)
        return ready

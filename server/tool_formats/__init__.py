"""Tool-call formats: how each model family writes calls, parsed from its
output and forced by a grammar.

``tool_format_for`` picks the served model's format once, at start: from
``--tool-call-parser`` when named, else from its chat template (the marks
each family's template writes: gpt-oss's ``<|channel|>``, Qwen3-Coder's ``<function=``, Mistral's
``[TOOL_CALLS]``, DeepSeek's ``<｜tool▁calls▁begin｜>``, Llama 3's
``<|python_tag|>``), Hermes' ``<tool_call>`` otherwise (also for templates
that know no tools: ``server.tools`` gives those a Hermes preamble).
"""

from typing import Any

from server.tool_formats.base import Function, TokenLiterals, ToolFormat
from server.tool_formats.deepseek import DeepSeekFormat
from server.tool_formats.harmony import HarmonyFormat
from server.tool_formats.hermes import HermesFormat
from server.tool_formats.llama3_json import Llama3JsonFormat
from server.tool_formats.mistral import MistralFormat
from server.tool_formats.parser import ToolCallParser, new_call
from server.tool_formats.qwen3_coder import Qwen3CoderFormat

# In detection order: the first whose marks the template has (Qwen3-Coder's also has Hermes' tag).
FORMATS: tuple[type[ToolFormat], ...] = (
    HarmonyFormat,
    Qwen3CoderFormat,
    MistralFormat,
    DeepSeekFormat,
    Llama3JsonFormat,
    HermesFormat,
)
TOOL_CALL_PARSERS = ("auto", *(f.name for f in FORMATS))

__all__ = ["FORMATS", "TOOL_CALL_PARSERS", "Function", "HarmonyFormat", "ToolCallParser", "ToolFormat", "new_call", "tool_format_for"]


def tool_format_for(parser_name: str, template: str | None, tokenizer: Any | None) -> ToolFormat:
    """The served model's format: the named one, or (``auto``) the first its template shows."""
    template = template or ""
    if parser_name == "auto":
        chosen = next((f for f in FORMATS if f.detects(template)), HermesFormat)
    else:
        chosen = next(f for f in FORMATS if f.name == parser_name)
    return chosen(TokenLiterals(tokenizer), template)

"""The serving state every route depends on: the loaded engine and the
model's identity (``Served``), and the ``served`` dependency that hands it
to a route, or answers 503 while the model loads, the server drains, or
after the engine died. Route modules import this, never ``server.app``, so
the app factory can import them without an import circle.
"""

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from batching.batcher import DynamicBatcher
from batching.errors import EngineUnavailableError
from batching.pooling_params import PoolingModel
from batching.request import EncoderDecoderPrompts
from batching.thinking import ThinkingSpec
from server.harmony import HarmonyParser
from server.output_parser import OutputParser
from server.reasoning import ReasoningFormat, ReasoningParser, reasoning_format
from server.token_bytes import TokenBytes
from server.tool_formats import HarmonyFormat, ToolFormat, tool_format_for
from server.tools import ToolPlan


@dataclass(slots=True)
class Served:
    """What the routes need: the batcher, its tokenizer and the model's identity."""

    batcher: DynamicBatcher
    tokenizer: Any
    model_name: str
    max_model_len: int
    model_root: str = ""
    chat_template: str | None = None
    reasoning_parser: str = "auto"  # --reasoning-parser
    tool_call_parser: str = "auto"  # --tool-call-parser
    token_bytes: TokenBytes = field(init=False)
    # The served model's thinking-block format (None: its output is all answer).
    reasoning: ReasoningFormat | None = field(init=False)
    # How the served model writes tool calls (for templates that render tools).
    tool_format: ToolFormat = field(init=False)
    # Set for an encoder-decoder model: prompts are its sources.
    encoder_decoder: EncoderDecoderPrompts | None = field(init=False)
    # Set for a pooling model (an embedder): it serves /v1/embeddings, and no generating route.
    pooling: PoolingModel | None = field(init=False)
    # The output is read by special tokens, so its text keeps them: harmony's
    # channels, or thinking tags that are special tokens of this vocabulary.
    keeps_special_tokens: bool = field(init=False)

    def __post_init__(self) -> None:
        self.token_bytes = TokenBytes(self.tokenizer)
        self.encoder_decoder = self.batcher.encoder_decoder
        self.pooling = self.batcher.pooling
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        template = template if isinstance(template, str) else None
        self.reasoning = reasoning_format(self.reasoning_parser, template)
        self.tool_format = tool_format_for(self.tool_call_parser, template, self.tokenizer)
        special = self.tool_format.literals.is_special  # the vocabulary's added tokens, read once
        tags = (self.reasoning.start_tag, self.reasoning.end_tag) if self.reasoning is not None else ()
        self.keeps_special_tokens = self.is_harmony or any(special(tag) for tag in tags)

    @property
    def is_harmony(self) -> bool:
        """gpt-oss's harmony format: channels, not tags, tell thinking, answer and calls apart."""
        return isinstance(self.tool_format, HarmonyFormat)

    def output_parser(self, plan: ToolPlan | None, opens_reasoning: bool) -> OutputParser | HarmonyParser:
        """A fresh splitter of one output's text into reasoning, content and
        calls, as this model writes them (``plan``: the request's tools)."""
        tool_format = plan.tool_format if plan is not None else self.tool_format
        if isinstance(tool_format, HarmonyFormat):
            parses_calls = plan is not None and plan.parses_calls
            return HarmonyParser(tool_format, plan.functions if plan else [], parses_calls, keep_partial=not (plan and plan.is_forced))
        reasoning = ReasoningParser(self.reasoning, opens_reasoning) if self.reasoning is not None else None
        return OutputParser(reasoning, plan.parser() if plan is not None and plan.parses_calls else None)

    @property
    def thinks(self) -> bool:
        """The model's thinking is split from its answer (a reasoning parser, or harmony's channels)."""
        return self.reasoning is not None or self.is_harmony

    def thinking_spec(self, is_open_at_start: bool, max_thinking_tokens: int | None) -> ThinkingSpec | None:
        """The token-level view of the model's thinking block for one request (None: the model does not think)."""
        if self.reasoning is None:
            return None
        start, end = (
            tuple(self.tokenizer.encode(tag, add_special_tokens=False)) for tag in (self.reasoning.start_tag, self.reasoning.end_tag)
        )
        return ThinkingSpec(start, end, is_open_at_start, max_thinking_tokens)


def served(request: Request) -> Served:
    """Dependency: the loaded engine, or 503 while it loads, drains or after it died."""
    state: Served | None = request.app.state.served
    if state is None:
        raise EngineUnavailableError("the model is still loading")
    state.batcher.check_available()
    return state

"""Chat messages -> prompt token ids: the one place a conversation becomes a
prompt, for ``/v1/chat/completions``, ``/v1/responses`` and ``/tokenize``.

Messages arrive as plain dicts in the chat-completions shape (role, content,
assistant ``tool_calls``, ``tool`` results); ``server.tools`` folds tools in
(natively where the template knows them, Hermes-style text otherwise); the
chat template renders text, tokenized WITHOUT adding special tokens again
(the template has them, and a doubled BOS silently degrades answers).
Because every route renders through ``build_chat_prompt``, ``/tokenize``
counts exactly the tokens the model would see (``usage.prompt_tokens``).
"""

from dataclasses import dataclass
from typing import Any

from batching.errors import InvalidRequestError
from server.protocol import ChatMessage, ChatTemplateFields
from server.state import Served
from server.tools import ToolPlan, plan_tools, template_handles_tools, template_messages


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered conversation: its token ids and what its tools mean (None: no tools)."""

    token_ids: list[int]
    plan: ToolPlan | None
    opens_reasoning: bool = False  # the prompt ends inside a thinking block: the output starts as reasoning


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Validated chat messages as the template expects them (400 naming the message)."""
    converted = []
    for position, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            non_text = [part.type for part in content if part.type != "text"]
            if non_text:
                raise InvalidRequestError(
                    f"content part type {non_text[0]!r} is not supported (text only)", param=f"messages.{position}.content"
                )
            content = "".join(part.text or "" for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name:
            entry["name"] = message.name
        extra = message.model_extra or {}
        if message.role == "assistant" and extra.get("tool_calls"):
            if not isinstance(extra["tool_calls"], list):
                raise InvalidRequestError("tool_calls must be a list", param=f"messages.{position}.tool_calls")
            entry["tool_calls"] = extra["tool_calls"]
        if message.role == "tool":
            if not isinstance(extra.get("tool_call_id"), str):
                raise InvalidRequestError("a tool message needs the tool_call_id it answers", param=f"messages.{position}.tool_call_id")
            entry["tool_call_id"] = extra["tool_call_id"]
        converted.append(entry)
    return converted


def chat_template(state: Served) -> str:
    template = state.chat_template or getattr(state.tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequestError("this model has no chat template; start the server with --chat-template FILE", param="messages")
    return template


def build_chat_prompt(state: Served, messages: list[dict[str, Any]], fields: ChatTemplateFields) -> ChatPrompt:
    """Render ``messages`` with the request's tools and template options."""
    template = chat_template(state)
    native = template_handles_tools(template)
    # A template that knows no tools gets the Hermes preamble, so its calls are Hermes calls.
    plan = plan_tools(fields.tools, fields.tool_choice, fields.parallel_tool_calls, state.tool_format if native else None)
    messages, tool_kwargs = template_messages(messages, plan, native)
    continue_final = fields.continue_final_message
    try:
        text = state.tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=fields.add_generation_prompt and not continue_final,
            continue_final_message=continue_final,
            **{**tool_kwargs, **(fields.chat_template_kwargs or {})},
        )
    except Exception as exc:  # a template error is the request's fault (roles, ordering)
        raise InvalidRequestError(f"the chat template could not render these messages: {exc}", param="messages") from None
    # An encoder-decoder model's source is tokenized as its encoder was trained
    # on (T5 appends </s>, BART wraps in <s> ... </s>); its templates rarely add them.
    token_ids = state.tokenizer(text, add_special_tokens=state.encoder_decoder is not None).input_ids
    return ChatPrompt(token_ids, plan, state.reasoning is not None and state.reasoning.is_open_at_end(text))

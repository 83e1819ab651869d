"""Anthropic Messages requests -> the chat path's messages, tools and sampling fields."""

import json

import pytest

from batching.errors import InvalidRequestError
from server.messages_protocol import (
    MessagesRequest,
    chat_messages,
    chat_tool_choice,
    ends_in_prefill,
    response_stop_reason,
    sampling_fields,
    template_fields,
)


def request(**fields) -> MessagesRequest:
    return MessagesRequest(**{"model": "m", "max_tokens": 8, **fields})


def test_a_tool_round_trip_becomes_chat_messages_in_order():
    body = request(
        system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "two calls", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "no data"}], "is_error": True},
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],
    )
    messages = chat_messages(body)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "Weather in Paris and Rome?"}
    assert messages[2]["content"] == "Checking.", "an earlier turn's thinking is dropped"
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in messages[2]["tool_calls"]] == [
        ("toolu_1", "get_weather", {"city": "Paris"}),
        ("toolu_2", "get_weather", {"city": "Rome"}),
    ]
    assert messages[3:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data"},
        {"role": "user", "content": "Thanks."},
    ]
    assert not ends_in_prefill(messages)


def test_a_final_assistant_text_is_a_prefill_but_a_final_tool_use_is_not():
    prefill = chat_messages(request(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well"}]))
    assert ends_in_prefill(prefill) and template_fields(request(messages=[{}]), True).continue_final_message
    calls = [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]
    assert not ends_in_prefill(
        chat_messages(request(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": calls}]))
    )


def test_tools_and_tool_choice_take_the_chat_shape():
    tools = [{"name": "f", "description": "does f", "input_schema": {"type": "object"}}]
    fields = template_fields(request(messages=[{}], tools=tools, tool_choice={"type": "tool", "name": "f"}), False)
    assert fields.tools == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "does f"}}]
    assert fields.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert chat_tool_choice({"type": "any", "disable_parallel_tool_use": True}) == ("required", False)
    assert chat_tool_choice({"type": "auto"}) == ("auto", True)
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        chat_tool_choice({"type": "tool"})


def test_sampling_fields_and_the_output_format():
    fields = sampling_fields(
        request(
            messages=[{}],
            temperature=0.5,
            top_k=4,
            stop_sequences=["\n\n"],
            output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
        )
    )
    assert (fields.temperature, fields.top_k, fields.stop) == (0.5, 4, ["\n\n"])
    assert fields.response_format.type == "json_schema" and fields.response_format.json_schema.schema_ == {"type": "object"}
    assert sampling_fields(request(messages=[{}])).temperature == 1.0, "Anthropic's default temperature"
    with pytest.raises(InvalidRequestError) as caught:
        sampling_fields(request(messages=[{}], output_config={"format": {"type": "json_object"}}))
    assert caught.value.param == "output_config.format"


@pytest.mark.parametrize(
    "finish_reason, stop_reason, expected",
    [
        ("tool_calls", None, "tool_use"),
        ("length", None, "max_tokens"),
        ("stop", "###", "stop_sequence"),
        ("stop", None, "end_turn"),
        ("stop", 2, "end_turn"),
    ],
)
def test_stop_reasons(finish_reason, stop_reason, expected):
    assert response_stop_reason(finish_reason, stop_reason) == expected

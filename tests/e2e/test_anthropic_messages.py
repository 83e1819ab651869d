"""``/v1/messages`` (Anthropic's Messages API) through the official ``anthropic``
SDK against a real ``tokenstep serve``: text equal to the chat route's, the
typed event stream, stop sequences, a prefill, tool use (forced, streamed, and
a ``tool_result`` round trip), ``count_tokens``, ``x-api-key`` auth, and
Anthropic-shaped errors for what is refused."""

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import API_KEY, SMALL_BODY_LIMIT

MODEL = "tiny"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_SCHEMA}
FORCE_WEATHER = {"type": "tool", "name": "get_weather"}
HELLO = [{"role": "user", "content": "Hello there"}]
# The newest SDKs no longer take temperature as an argument; older ones and other clients send it.
GREEDY = {"extra_body": {"temperature": 0}}
SAMPLED = {"extra_body": {"temperature": 1.0}}


def client_for(server, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=api_key, max_retries=0)


def chat_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_text_message_equals_the_chat_routes_answer(tiny_server):
    message = client_for(tiny_server).messages.create(model=MODEL, system="Be brief.", messages=HELLO, max_tokens=8, **GREEDY)
    chat = chat_for(tiny_server).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *HELLO], max_tokens=8, temperature=0
    )
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == MODEL
    assert text_of(message) == chat.choices[0].message.content
    assert message.usage.input_tokens == chat.usage.prompt_tokens
    assert message.usage.output_tokens == chat.usage.completion_tokens
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert message.stop_sequence is None


def test_count_tokens_is_the_messages_input_tokens(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}], messages=HELLO)
    counted = client.messages.count_tokens(**kwargs, tools=[WEATHER_TOOL])
    message = client.messages.create(**kwargs, tools=[WEATHER_TOOL], max_tokens=1, **GREEDY)
    assert counted.input_tokens == message.usage.input_tokens > 0
    assert client.messages.count_tokens(**kwargs).input_tokens < counted.input_tokens, "the tools are part of the prompt"


def test_stream_events_come_in_anthropics_order_and_build_the_same_message(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=12, **GREEDY)
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert text_of(final) == text_of(whole) and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens

    events = list(client.messages.create(stream=True, **kwargs))
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert "".join(event.delta.text for event in events[2:-3]) == text_of(whole)
    assert events[-2].delta.stop_reason == whole.stop_reason and events[-2].usage.output_tokens == whole.usage.output_tokens


def test_a_stop_sequence_ends_the_message_and_is_named(tiny_server):
    client = client_for(tiny_server)
    text = text_of(client.messages.create(model=MODEL, messages=HELLO, max_tokens=16, **GREEDY))
    stop = text[4:7]
    assert len(stop.strip()) > 0, f"the tiny model's greedy text is too short to cut: {text!r}"
    message = client.messages.create(model=MODEL, messages=HELLO, max_tokens=16, **GREEDY, stop_sequences=[stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert text_of(message) == text[: text.find(stop)]


def test_a_final_assistant_turn_is_continued(tiny_server):
    prefill = [*HELLO, {"role": "assistant", "content": "Well"}]
    message = client_for(tiny_server).messages.create(model=MODEL, messages=prefill, max_tokens=6, **GREEDY)
    chat = chat_for(tiny_server).chat.completions.create(
        model=MODEL,
        messages=prefill,
        max_tokens=6,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert text_of(message) == chat.choices[0].message.content
    assert message.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("seed_text", ["Paris?", "And Rome?"])
def test_a_forced_tool_use_validates_and_a_tool_result_continues(tiny_server, seed_text):
    client = client_for(tiny_server)
    asked = [{"role": "user", "content": f"What is the weather in {seed_text}"}]
    message = client.messages.create(
        model=MODEL, messages=asked, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=200, **SAMPLED
    )
    assert message.stop_reason == "tool_use"
    (call,) = message.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER_SCHEMA)

    result = {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "Sunny, 21 C"}]}
    turns = [*asked, {"role": "assistant", "content": message.content}, {"role": "user", "content": [result]}]
    answer = client.messages.create(model=MODEL, messages=turns, tools=[WEATHER_TOOL], max_tokens=4, **GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert client.messages.count_tokens(model=MODEL, messages=turns, tools=[WEATHER_TOOL]).input_tokens == answer.usage.input_tokens


def test_a_streamed_tool_use_carries_json_that_parses(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, messages=HELLO, tools=[WEATHER_TOOL], tool_choice={"type": "any"}, max_tokens=200, **GREEDY)
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == whole.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content] == [(b.name, b.input) for b in whole.content]

    events = list(client.messages.create(stream=True, **kwargs))
    starts = [event for event in events if event.type == "content_block_start"]
    assert [event.content_block.type for event in starts] == ["tool_use"] * len(whole.content)
    for start in starts:
        partial = "".join(
            event.delta.partial_json for event in events if event.type == "content_block_delta" and event.index == start.index
        )
        assert json.loads(partial) == whole.content[start.index].input


def test_output_config_format_constrains_the_text_to_the_schema(tiny_server):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    message = client_for(tiny_server).messages.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=64,
        output_config={"format": {"type": "json_schema", "schema": schema}},
        thinking={"type": "adaptive"},  # the model decides; this one never thinks
        **SAMPLED,
    )
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(message)), schema)


@pytest.mark.parametrize(
    "change, param",
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]},
            "messages.0.content.0.type",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking.type"),
        ({"output_config": {"effort": "low"}}, "output_config.effort"),
        ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_what_is_not_served_is_an_anthropic_400_naming_the_field(tiny_server, change, param):
    client = client_for(tiny_server)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(**{"model": MODEL, "messages": HELLO, "max_tokens": 4, **change})
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert param in body["error"]["message"]


def test_an_unknown_model_and_a_missing_field_answer_in_anthropics_shape(tiny_server):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client_for(tiny_server).messages.create(model="claude-nonexistent", messages=HELLO, max_tokens=4)
    assert caught.value.body["error"]["type"] == "not_found_error"
    response = httpx.post(f"{tiny_server.base_url}/v1/messages", json={"model": MODEL, "messages": HELLO}, timeout=30)
    assert response.status_code == 400
    assert response.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": response.json()["error"]["message"]}}
    assert "max_tokens" in response.json()["error"]["message"]


def test_the_api_key_may_come_as_x_api_key(guarded_server):
    message = client_for(guarded_server, API_KEY).messages.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert message.usage.output_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client_for(guarded_server, "wrong-key").messages.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert caught.value.body["error"]["type"] == "authentication_error"
    openai_shaped = httpx.get(f"{guarded_server.base_url}/v1/models", headers={"x-api-key": API_KEY}, timeout=30)
    assert openai_shaped.status_code == 200, "every /v1 route takes the key as x-api-key too"


def test_a_body_over_the_limit_is_an_anthropic_413(guarded_server):
    long = [{"role": "user", "content": "x" * (2 * SMALL_BODY_LIMIT)}]
    with pytest.raises(anthropic.APIStatusError) as caught:
        client_for(guarded_server, API_KEY).messages.create(model=MODEL, messages=long, max_tokens=2)
    assert caught.value.status_code == 413 and caught.value.body["error"]["type"] == "request_too_large"

"""``/v1/responses`` through the official OpenAI SDK (and the OpenAI Agents
SDK) against a real ``tokenstep serve``: text, structured output with
``responses.parse``, a function-tool round trip over ``previous_response_id``,
the typed event stream, retrieve and delete, and what is refused."""

import asyncio
import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.test_api_misc import wait_until_idle

MODEL = "tiny"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
GREEDY = {"temperature": 0}


class City(BaseModel):
    name: str = Field(max_length=12)  # bounded: the random tiny model would ramble
    is_capital: bool


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_text_response_matches_chat(tiny_server):
    client = client_for(tiny_server)
    response = client.responses.create(model=MODEL, input="Hello there", instructions="Be brief.", max_output_tokens=8, **GREEDY)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=8,
        **GREEDY,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_output_text_logprobs_and_metadata(tiny_server):
    client = client_for(tiny_server)
    metadata = {"trace": "abc"}
    response = client.responses.create(
        model=MODEL, input="Hi", max_output_tokens=5, include=["message.output_text.logprobs"], top_logprobs=2, metadata=metadata, **GREEDY
    )
    part = response.output[0].content[0]
    assert len(part.logprobs) == response.usage.output_tokens == 5
    assert all(len(entry.top_logprobs) <= 3 for entry in part.logprobs)
    assert b"".join(bytes(entry.bytes) for entry in part.logprobs).decode("utf-8", errors="ignore") == part.text
    assert response.metadata == metadata
    plain = client.responses.create(model=MODEL, input="Hi", max_output_tokens=5, **GREEDY)
    assert plain.output[0].content[0].logprobs == [] and plain.output_text == response.output_text


def test_parse_follows_the_pydantic_schema(tiny_server):
    client = client_for(tiny_server)
    parsed = client.responses.parse(model=MODEL, input="A city as JSON", text_format=City, max_output_tokens=200, **GREEDY)
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, City)
    assert City.model_validate_json(parsed.output_text) == parsed.output_parsed


def test_function_tool_round_trip_with_previous_response_id(tiny_server):
    client = client_for(tiny_server)
    first = client.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=80,
        **GREEDY,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and len(calls) == 1
    assert calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments)["city"], str)
    assert calls[0].call_id.startswith("call_") and calls[0].id.startswith("fc_")
    tool_output = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=[tool_output], tools=[WEATHER_TOOL], max_output_tokens=6, **GREEDY
    )
    assert second.previous_response_id == first.id
    # The stored conversation (question, call, result) is in the prompt: the
    # same turn sent whole, without previous_response_id, counts the same.
    whole = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        tool_output,
    ]
    again = client.responses.create(model=MODEL, input=whole, tools=[WEATHER_TOOL], max_output_tokens=6, **GREEDY)
    assert second.usage.input_tokens == again.usage.input_tokens > first.usage.input_tokens
    assert second.output_text == again.output_text


def test_stream_events_in_order_and_deltas_join(tiny_server):
    client = client_for(tiny_server)
    with client.responses.stream(
        model=MODEL, input="Tell me something", max_output_tokens=12, extra_body={"ignore_eos": True, "min_tokens": 12}, **GREEDY
    ) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == deltas == events[-4].text
    assert final.usage.output_tokens == 12
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == deltas and stored.status == "incomplete"


def test_streamed_function_call_events(tiny_server):
    client = client_for(tiny_server)
    with client.responses.stream(
        model=MODEL,
        input="Weather?",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=80,
        **GREEDY,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[2:6] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert kinds[-1] == "response.completed"
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert events[4].arguments == call.arguments and json.loads(call.arguments)["city"]


def test_retrieve_delete_and_unknown_ids(tiny_server):
    client = client_for(tiny_server)
    response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, **GREEDY)
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    client.responses.delete(response.id)
    for call in (
        lambda: client.responses.retrieve(response.id),
        lambda: client.responses.delete(response.id),
        lambda: client.responses.create(model=MODEL, input="again", previous_response_id=response.id),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["code"] == "response_not_found"
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0.type"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"tool_choice": {"type": "file_search"}, "tools": [WEATHER_TOOL]}, "tool_choice"),
    ],
)
def test_unsupported_fields_are_400_naming_them(tiny_server, fields, param):
    body = {"model": MODEL, "input": "hi", **fields}
    response = httpx.post(f"{tiny_server.base_url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_disconnected_stream_frees_its_request(tiny_server):
    body = {"model": MODEL, "input": "a long story", "max_output_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tiny_server.base_url}/v1/responses", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if "response.output_text.delta" in line:
                break  # leave mid-stream
    wait_until_idle(tiny_server, timeout_s=5)


def test_openai_agents_runs_a_function_tool(default_server):
    """An Agents-SDK agent with one tool, on the Responses API of the default model."""
    import agents  # openai-agents, from the test extras (imported here: it is slow to import)

    agents.set_tracing_disabled(True)  # no trace export: nothing leaves the machine
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        cities.append(city)
        return f"It is sunny in {city}."

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0)
        model = agents.OpenAIResponsesModel(model="smollm2-135m-instruct", openai_client=client)
        settings = agents.ModelSettings(temperature=0, max_tokens=60, tool_choice="required")
        agent = agents.Agent(
            name="weather",
            instructions="Answer weather questions with the get_weather tool.",
            tools=[get_weather],
            model=model,
            model_settings=settings,
        )
        try:
            result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3)
        finally:
            await client.close()
        return result.final_output

    final_output = asyncio.run(run())
    assert cities and all(isinstance(city, str) and city for city in cities)
    assert isinstance(final_output, str) and final_output


def test_a_forced_call_cut_short_is_an_incomplete_function_call(tiny_server):
    response = client_for(tiny_server).responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=20,
        **GREEDY,
    )
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (item,) = response.output
    assert (item.type, item.status, item.name) == ("function_call", "incomplete", "get_weather")
    with pytest.raises(ValueError):
        json.loads(item.arguments)

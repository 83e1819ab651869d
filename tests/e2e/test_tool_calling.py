"""Tool calling through the official OpenAI SDK against a real ``tokenstep serve``:
forced calls (named, ``required``) are constrained and come back as SDK
``tool_calls`` objects, streaming or not; a ``tool`` message continues the chat."""

import json

import httpx
import jsonschema
import openai
import pytest

MODEL = "tiny"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_PARAMETERS}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def check_weather_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_tool_choice_forces_a_valid_call(tiny_server, seed):
    client = client_for(tiny_server)
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=FORCE_WEATHER, max_completion_tokens=200, temperature=1.0, seed=seed
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_weather_call(choice.message.tool_calls[0])


def test_streamed_tool_call_is_reassembled_by_the_sdk(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=FORCE_WEATHER, max_completion_tokens=200, temperature=1.0, seed=5
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    streamed = choice.message.tool_calls[0]
    check_weather_call(streamed)
    assert (streamed.function.name, streamed.function.arguments) == (whole.function.name, whole.function.arguments)

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    fragments = [call for chunk in chunks for choice in chunk.choices for call in (choice.delta.tool_calls or [])]
    assert fragments and fragments[0].index == 0 and fragments[0].id.startswith("call_")
    assert not any(choice.delta.content for chunk in chunks for choice in chunk.choices), "a forced call leaks no content"


def test_required_gives_calls_of_the_given_tools(tiny_server):
    client = client_for(tiny_server)
    names = set()
    for seed in range(4):
        # One call each (a random model would rather chain calls than stop).
        completion = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_completion_tokens=300,
            temperature=1.0,
            seed=seed,
            n=2,
        )
        for choice in completion.choices:
            assert choice.finish_reason == "tool_calls"
            assert len(choice.message.tool_calls) == 1
            for call in choice.message.tool_calls:
                names.add(call.function.name)
                if call.function.name == "get_weather":
                    check_weather_call(call)
                else:
                    assert json.loads(call.function.arguments) == {}
    assert names <= {"get_weather", "get_time"} and names

    # With parallel calls allowed, every call (however many) is valid.
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_completion_tokens=200, temperature=1.0, seed=9
    )
    calls = completion.choices[0].message.tool_calls
    assert calls and all(call.function.name in ("get_weather", "get_time") for call in calls)


def test_a_forced_call_cut_by_max_tokens_comes_back_as_written_so_far(tiny_server):
    """As OpenAI answers it: the call, its arguments unfinished (not valid JSON), and finish_reason length,
    so a client parsing the arguments fails loudly instead of getting nothing."""
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=FORCE_WEATHER, max_completion_tokens=20, temperature=0)
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)
    with pytest.raises(openai.LengthFinishReasonError), client.chat.completions.stream(**kwargs) as stream:
        stream.get_final_completion()  # the SDK's helper itself refuses a cut output
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    fragments = [f.function for chunk in chunks for choice in chunk.choices for f in choice.delta.tool_calls or []]
    assert [(f.name, f.arguments) for f in fragments] == [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_auto_and_none_return_text_when_the_model_calls_nothing(tiny_server):
    client = client_for(tiny_server)
    for tool_choice in ("auto", "none"):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=tool_choice,
            max_completion_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "length"
        assert choice.message.tool_calls is None
        assert choice.message.content


def test_tools_reach_the_prompt_and_a_tool_result_continues_the_chat(tiny_server):
    client = client_for(tiny_server)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=1, temperature=0)
    with_tools = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_completion_tokens=1, temperature=0)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 40, "the tool signatures are in the prompt"

    call = (
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=FORCE_WEATHER, max_completion_tokens=200, temperature=0
        )
        .choices[0]
        .message
    )
    follow_up = MESSAGES + [
        call.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": '{"temperature": 18}'},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=follow_up, tools=TOOLS, max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens > with_tools.usage.prompt_tokens + 10


BAD_TOOL_REQUESTS = [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}], "tool_choice": "required"},
        "tools",
    ),
    ({"tools": TOOLS, "tool_choice": FORCE_WEATHER, "guided_regex": "a+"}, "guided_regex"),
    ({"messages": MESSAGES + [{"role": "tool", "content": "18"}]}, "messages"),
]


@pytest.mark.parametrize("fields, param", BAD_TOOL_REQUESTS, ids=[f"{param}-{i}" for i, (_, param) in enumerate(BAD_TOOL_REQUESTS)])
def test_bad_tool_requests_are_400(tiny_server, fields, param):
    response = httpx.post(
        f"{tiny_server.base_url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, **fields}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].split(".")[0] == param, error


def test_default_model_fills_a_forced_call_sensibly(default_server):
    client = client_for(default_server)
    completion = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=TOOLS,
        tool_choice=FORCE_WEATHER,
        max_completion_tokens=60,
        temperature=0,
    )
    call = completion.choices[0].message.tool_calls[0]
    check_weather_call(call)
    assert "paris" in json.loads(call.function.arguments)["city"].lower()

"""Structured output over HTTP: ``response_format`` and vLLM's ``guided_*``
fields through the official OpenAI SDK against a real ``tokenstep serve``
with the tiny random model (so only the grammar makes the text valid)."""

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.test_api_misc import wait_until_idle

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000},
        "sights": {"type": "array", "items": {"enum": ["museum", "park", "bridge"]}, "maxItems": 3},
        "coast": {"type": "boolean"},
    },
    "required": ["city", "population", "sights", "coast"],
    "additionalProperties": False,
}


class City(BaseModel):
    city: str = Field(max_length=10)
    population: int = Field(ge=0, le=100000)
    coast: bool


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_sdk_parse_returns_a_validated_pydantic_object(tiny_server):
    client = client_for(tiny_server)
    completion = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=City, max_completion_tokens=300, temperature=1.0, seed=3
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, City)
    assert City.model_validate_json(message.content) == message.parsed


def test_json_schema_with_n_seeds_and_streaming(tiny_server):
    client = client_for(tiny_server)
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=response_format, max_completion_tokens=300, n=4, temperature=1.0, seed=11
    )
    texts = [choice.message.content for choice in completion.choices]
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format=response_format,
        max_completion_tokens=300,
        n=4,
        temperature=1.0,
        seed=11,
        stream=True,
    )
    streamed = ["", "", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts, "a seeded constrained request streams the same text"


def test_json_object_gives_an_object(tiny_server):
    client = client_for(tiny_server)
    for seed in range(3):
        completion = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, response_format={"type": "json_object"}, max_completion_tokens=400, temperature=0.7, seed=seed
        )
        if completion.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(completion.choices[0].message.content), dict)
        else:  # an unbounded object may run out of tokens; it is still a valid prefix
            assert completion.choices[0].finish_reason == "length"
            assert completion.choices[0].message.content.startswith("{")


def test_guided_choice_regex_and_json_on_completions(tiny_server):
    client = client_for(tiny_server)
    choices = ["positive", "negative", "neutral"]
    completion = client.completions.create(
        model=MODEL, prompt="Sentiment:", max_tokens=10, n=6, temperature=1.0, seed=5, extra_body={"guided_choice": choices}
    )
    assert all(choice.text in choices for choice in completion.choices)

    pattern = r"[A-Z]{2}-[0-9]{4}"
    stream = client.completions.create(
        model=MODEL, prompt="Code:", max_tokens=20, temperature=1.0, seed=1, stream=True, extra_body={"guided_regex": pattern}
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert re.fullmatch(pattern, text), text

    completion = client.completions.create(
        model=MODEL, prompt="JSON:", max_tokens=300, temperature=1.0, seed=2, extra_body={"guided_json": json.dumps(SCHEMA)}
    )
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)


def test_guided_grammar_is_lark(tiny_server):
    client = client_for(tiny_server)
    grammar = 'start: "SELECT " column " FROM " table\ncolumn: "id" | "name"\ntable: "users" | "orders"'
    completion = client.completions.create(
        model=MODEL, prompt="SQL:", max_tokens=20, temperature=1.0, seed=4, extra_body={"guided_grammar": grammar}
    )
    assert re.fullmatch(r"SELECT (id|name) FROM (users|orders)", completion.choices[0].text)


def test_running_out_of_tokens_is_length(tiny_server):
    client = client_for(tiny_server)
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=response_format, max_completion_tokens=4, temperature=0
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4


BAD_CONSTRAINTS = [
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
        "response_format",
        "frobnicate",
    ),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "'json_object'"),
    ({"guided_regex": "[a-z"}, "guided_regex", "unclosed"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_choice": []}, "guided_choice", "guided_choice"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one output constraint"),
]


@pytest.mark.parametrize("fields, param, words", BAD_CONSTRAINTS, ids=[words for _, _, words in BAD_CONSTRAINTS])
def test_a_bad_constraint_is_a_400_naming_the_problem(tiny_server, fields, param, words):
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
        response = httpx.post(f"{tiny_server.base_url}{path}", json={"model": MODEL, "max_tokens": 5, **body, **fields})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"].split(".")[0] == param, error
        assert words.lower() in error["message"].lower(), error
    wait_until_idle(tiny_server)

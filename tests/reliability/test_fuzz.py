"""Fuzz: schemathesis generates valid and invalid requests from the app's own
``/openapi.json`` for every route and sends them in-process (ASGI) to the
real engine on the tiny model. No response may be a 5xx, and every error
must be in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
(on Anthropic's ``/v1/messages`` routes, Anthropic's ``{"type": "error", "error": {"type", "message"}}``).

Bounded for CI: ``FUZZ_EXAMPLES`` examples per route (``TOKENSTEP_FUZZ_EXAMPLES``
to raise it), and generation lengths are clamped to a few tokens, because
the point is input handling, not decoding: a valid ``max_tokens`` of 1000 on
two CPU cores would only spend the time budget.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from model_runtime.loading.loader import LoadedModel
from server.app import create_app
from server.settings import Settings
from tests.reliability.support import build_served, parse_stream

FUZZ_EXAMPLES = int(os.environ.get("TOKENSTEP_FUZZ_EXAMPLES", "25"))
MAX_FUZZ_TOKENS = 4
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Routes whose default length is "the rest of the context", and the field to clamp it by.
DEFAULT_LENGTH_FIELD = {"/v1/chat/completions": "max_completion_tokens", "/v1/responses": "max_output_tokens"}
RESPONSES_LAST_EVENTS = {"response.completed", "response.incomplete"}
ANTHROPIC_PREFIX = "/v1/messages"


@pytest.fixture
def fuzz_app(tiny_llama_dir: Path, tiny_weights: LoadedModel) -> Iterator:
    served = build_served(tiny_llama_dir, tiny_weights, max_queue_len=64)
    app = create_app(Settings(max_queue_len=64, request_timeout=None), ready=served)
    yield app
    # schemathesis' pytest plugin ends the app's lifespan (started by its in-process
    # client) when each test tears down; hence a fresh app and engine per test.


@pytest.fixture
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


# Every operation in /openapi.json (test_every_operation_is_fuzzed keeps this list honest).
OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/rerank"),
    ("POST", "/v1/score"),
    ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/stats"),
]
schema = schemathesis.pytest.from_fixture("fuzz_schema")


def clamp_generation(case) -> None:
    """Keep valid token budgets tiny (invalid ones are left to be rejected)."""
    if not isinstance(case.body, dict):
        return
    for name in LENGTH_FIELDS:
        value = case.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value:
            case.body[name] = min(value, MAX_FUZZ_TOKENS)
    default_field = DEFAULT_LENGTH_FIELD.get(case.path)
    if default_field and not any(isinstance(case.body.get(name), int) for name in LENGTH_FIELDS):
        case.body[default_field] = MAX_FUZZ_TOKENS


def assert_openai_error_body(content: bytes) -> None:
    error = json.loads(content)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


def assert_anthropic_error_body(content: bytes) -> None:
    body = json.loads(content)
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body


def test_every_operation_is_fuzzed(fuzz_schema):
    found = {(result.ok().method.upper(), result.ok().path) for result in fuzz_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def check_response(case) -> None:
    clamp_generation(case)
    response = case.call()
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        (assert_anthropic_error_body if case.path.startswith(ANTHROPIC_PREFIX) else assert_openai_error_body)(response.content)
    elif any(value.startswith("text/event-stream") for value in response.headers.get("content-type", [])):
        stream = parse_stream(response.status_code, response.text)
        if case.path == "/v1/responses":  # typed events, no [DONE]
            assert stream.events and stream.events[-1]["type"] in RESPONSES_LAST_EVENTS, stream.body[-300:]
        elif case.path == ANTHROPIC_PREFIX:  # Anthropic's typed events, no [DONE]
            assert stream.events and stream.events[-1]["type"] == "message_stop", stream.body[-300:]
        else:
            stream.assert_ended_properly()
            assert not stream.errors, stream.errors


# GET and DELETE routes take no body, at most an id string: nothing to make invalid.
FUZZ_CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if not (mode is GenerationMode.NEGATIVE and method in ("GET", "DELETE"))
]


@pytest.mark.parametrize(
    "method,path,mode",
    FUZZ_CASES,
    ids=[f"{method} {path} {'valid' if mode is GenerationMode.POSITIVE else 'invalid'}" for method, path, mode in FUZZ_CASES],
)
def test_no_5xx_and_errors_in_openai_shape(fuzz_schema, method, path, mode):
    operation = fuzz_schema[path][method]
    if mode is GenerationMode.NEGATIVE:
        assert operation.body or list(operation.iter_parameters()), f"{method} {path} has nothing to make invalid"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=os.environ.get("TOKENSTEP_FUZZ_RANDOM") is None,
        database=None,
    )
    def fuzz(case) -> None:
        check_response(case)

    fuzz()

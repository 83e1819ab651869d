"""What real clients tripped over (issue: OpenAI API, second pass), each
through the public interface of a real ``tokenstep serve``: model retrieval,
the real bytes of partial-character tokens, /tokenize with tools, the field
an overflow names, forced calls cut by max_tokens, characters cut by
max_tokens, quiet disconnects and ``X-Request-Id`` (``created`` is checked
in-process: tests/server/test_created.py)."""

import json
import time

import httpx
import openai
import pytest

from tests.e2e.test_api_misc import sse_events, wait_until_idle

MODEL = "tiny"
WEATHER = "🌧☀️❄️"
PING_TOOL = [
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
]


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60, **kwargs)


def streamed_payloads(server, path: str, body: dict) -> list[dict]:
    response = post(server, path, {**body, "stream": True})
    assert response.status_code == 200
    return [json.loads(p) for p in sse_events(response.text) if p != "[DONE]"]


# ------------------------------------------------------------ 1. models


def test_sdk_retrieves_the_served_model_as_listed(tiny_server):
    client = client_for(tiny_server)
    listed = client.models.list().data[0]
    retrieved = client.models.retrieve(MODEL)
    assert retrieved.model_dump() == listed.model_dump()
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["type"] == "not_found_error"


# ------------------------------------------------------------ 2. logprob bytes


def _joined_bytes(entries: list[dict]) -> bytes:
    return b"".join(bytes(entry["bytes"] or []) for entry in entries)


def test_default_model_partial_character_logprobs_carry_real_bytes(default_server):
    """The issue's repro: each token holds part of an emoji."""
    body = {
        "messages": [{"role": "user", "content": f"Reply with three weather emoji only: {WEATHER}"}],
        "max_tokens": 3,
        "logprobs": True,
        "top_logprobs": 2,
        "temperature": 0,
    }
    choice = post(default_server, "/v1/chat/completions", body).json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert [239, 191, 189] not in [entry["bytes"] for entry in entries]
    assert _joined_bytes(entries).decode("utf-8", errors="ignore") == choice["message"]["content"]
    for entry in entries:
        assert "\ufffd" not in entry["token"]
        for top in entry["top_logprobs"]:
            assert top["bytes"] != [239, 191, 189]
    streamed = streamed_payloads(default_server, "/v1/chat/completions", body)
    streamed_entries = [
        entry for chunk in streamed for choice in chunk["choices"] if choice.get("logprobs") for entry in choice["logprobs"]["content"]
    ]
    strip = lambda items: [(entry["token"], entry["bytes"]) for entry in items]  # noqa: E731 (logprobs differ in the last bits)
    assert strip(streamed_entries) == strip(entries)


def test_bytes_rebuild_the_text_of_a_forced_emoji_answer(tiny_server):
    """The grammar makes the random model write emoji; every token's bytes
    join to exactly the content (streamed and not)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "weather?"}],
        "guided_choice": [WEATHER + " ok"],
        "logprobs": True,
        "temperature": 0,
    }
    choice = post(tiny_server, "/v1/chat/completions", body).json()["choices"][0]
    assert choice["message"]["content"] == WEATHER + " ok"
    entries = choice["logprobs"]["content"]
    assert any(
        entry["bytes"] and bytes(entry["bytes"]).decode("utf-8", errors="replace") != bytes(entry["bytes"]).decode("utf-8", errors="ignore")
        for entry in entries
    ), "no partial-character token: the test proves nothing"
    assert _joined_bytes(entries).decode() == WEATHER + " ok"


def _check_legacy_offsets(text: str, logprobs: dict) -> None:
    """Every token starts at its text_offset; a partial-character token
    points at the character it belongs to; offsets never pass the text."""
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert offsets == sorted(offsets)
    for offset, token in zip(offsets, tokens):
        assert offset <= len(text)
        if "\\x" not in token:
            assert text[offset:].startswith(token), (offset, token)
        else:
            whole = token.split("\\x")[0]  # text before the partial bytes
            assert text[offset:].startswith(whole)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_offsets_match_the_text_through_emoji(tiny_server, stream):
    body = {"model": MODEL, "prompt": f"Weather: {WEATHER} and", "max_tokens": 4, "logprobs": 1, "echo": True, "temperature": 0}
    if stream:
        chunks = streamed_payloads(tiny_server, "/v1/completions", body)
        text = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])
        logprobs = {
            key: [
                v for chunk in chunks if chunk["choices"] and chunk["choices"][0]["logprobs"] for v in chunk["choices"][0]["logprobs"][key]
            ]
            for key in ("tokens", "text_offset")
        }
    else:
        choice = post(tiny_server, "/v1/completions", body).json()["choices"][0]
        text, logprobs = choice["text"], choice["logprobs"]
    assert text.startswith(f"Weather: {WEATHER} and")
    assert "\\xf0\\x9f" in " ".join(logprobs["tokens"])  # the emoji is split into byte tokens
    _check_legacy_offsets(text, logprobs)
    emoji_offset = text.index(WEATHER)
    partial = [offset for offset, token in zip(logprobs["text_offset"], logprobs["tokens"]) if token.endswith("\\x9f")]
    assert partial[0] == emoji_offset - 1  # ' \xf0\x9f': the space, then the emoji's first bytes


# ------------------------------------------------------------ 3. /tokenize


def test_tokenize_counts_what_chat_sends_with_tools(tiny_server):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    counted = post(tiny_server, "/tokenize", {"model": MODEL, "messages": messages, "tools": tools}).json()["count"]
    without_tools = post(tiny_server, "/tokenize", {"model": MODEL, "messages": messages[:1]}).json()["count"]
    usage = post(tiny_server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 1}).json()[
        "usage"
    ]
    assert counted == usage["prompt_tokens"]
    assert counted > without_tools + 50  # the tool preamble, the call and its result are in


# ------------------------------------------------------------ 4. overflow param


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_overflow_names_the_field_sent(tiny_server, field):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: 10**6}
    error = post(tiny_server, "/v1/chat/completions", body).json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == field


# ------------------------------------------------------------ 5. required + cut


@pytest.mark.parametrize("stream", [False, True])
def test_forced_calls_cut_by_max_tokens_finish_with_tool_calls(tiny_server, stream):
    """With the end tokens banned the grammar can only start another call,
    so the model repeats calls until max_tokens cuts one."""
    no_end = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "ping"}],
        "tools": PING_TOOL,
        "tool_choice": "required",
        "max_tokens": 150,
        "logit_bias": no_end,
        "temperature": 0,
    }
    if stream:
        chunks = streamed_payloads(tiny_server, "/v1/chat/completions", body)
        calls = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls") or []]
        finish_reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        response = post(tiny_server, "/v1/chat/completions", body).json()
        assert response["usage"]["completion_tokens"] == body["max_tokens"]  # it was cut
        choice = response["choices"][0]
        calls, finish_reason = choice["message"]["tool_calls"], choice["finish_reason"]
        assert choice["message"]["content"] is None
    assert calls and all(call["function"]["name"] == "ping" and json.loads(call["function"]["arguments"]) == {} for call in calls)
    assert finish_reason == "tool_calls"


# ------------------------------------------------------------ 6. cut characters


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5])
def test_max_tokens_inside_a_character_never_emits_a_broken_one(tiny_server, max_tokens):
    body = {"model": MODEL, "prompt": "weather:", "guided_choice": [WEATHER], "max_tokens": max_tokens, "temperature": 0}
    response = post(tiny_server, "/v1/completions", body).json()
    text = response["choices"][0]["text"]
    assert "\ufffd" not in text and WEATHER.startswith(text)
    assert response["usage"]["completion_tokens"] == max_tokens or response["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(chunk["choices"][0]["text"] for chunk in streamed_payloads(tiny_server, "/v1/completions", body) if chunk["choices"])
    assert streamed == text


# ------------------------------------------------------------ 7. disconnects


def test_non_streaming_disconnect_is_one_info_line(tiny_server):
    request_id = f"gone-{time.monotonic_ns()}"
    body = {"model": MODEL, "prompt": "a long request", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{tiny_server.base_url}/v1/completions", json=body, headers={"X-Request-Id": request_id}, timeout=httpx.Timeout(10, read=0.5)
        )
    wait_until_idle(tiny_server)
    deadline = time.monotonic() + 5
    while request_id not in (log := tiny_server.log_path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in log.splitlines() if request_id in line]
    assert any("INFO" in line and "client disconnected" in line for line in lines), lines
    assert any(" 499 " in line for line in lines), lines
    assert "Traceback" not in log and "Exception in ASGI application" not in log and "unhandled error" not in log


# ------------------------------------------------------------ 8. X-Request-Id (created: tests/server/test_created.py)


def test_x_request_id_is_echoed_or_the_request_id(tiny_server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    mine = post(tiny_server, "/v1/completions", body, headers={"X-Request-Id": "trace-abc-123"})
    assert mine.headers["x-request-id"] == "trace-abc-123"
    plain = post(tiny_server, "/v1/completions", body)
    assert plain.headers["x-request-id"] == plain.json()["id"]
    streamed = post(
        tiny_server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
    )
    assert streamed.headers["x-request-id"] == json.loads(sse_events(streamed.text)[0])["id"]
    for response in (
        httpx.get(f"{tiny_server.base_url}/v1/models"),
        post(tiny_server, "/v1/completions", {"prompt": "x", "temperature": 9}),
    ):
        assert response.headers["x-request-id"]
    too_long = post(tiny_server, "/v1/completions", body, headers={"X-Request-Id": "x" * 300})
    assert too_long.headers["x-request-id"] == too_long.json()["id"]  # replaced, not echoed
    access_line = f"request_id={plain.json()['id']} POST /v1/completions 200"
    deadline = time.monotonic() + 10
    while access_line not in (log := tiny_server.log_path.read_text()):
        assert time.monotonic() < deadline, f"{access_line!r} never reached the log"
        time.sleep(0.05)
    assert " GET /health " not in log  # probes are logged at DEBUG only


# ------------------------------------------------------------ continuous usage (vLLM)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_put_usage_so_far_in_every_chunk(tiny_server, path):
    prompt = {"prompt": "count"} if "chat" not in path else {"messages": [{"role": "user", "content": "count"}]}
    body = {
        "model": MODEL,
        **prompt,
        "max_tokens": 6,
        "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = streamed_payloads(tiny_server, path, body)
    with_choices = [chunk for chunk in chunks if chunk["choices"] and chunk.get("usage")]
    counts = [chunk["usage"]["completion_tokens"] for chunk in with_choices]
    assert with_choices and counts == sorted(counts) and counts[-1] == 6
    assert all(
        chunk["usage"]["total_tokens"] == chunk["usage"]["prompt_tokens"] + chunk["usage"]["completion_tokens"] for chunk in with_choices
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    plain = streamed_payloads(tiny_server, path, {**body, "stream_options": {"include_usage": True}})
    assert not any(chunk.get("usage") for chunk in plain if chunk["choices"])

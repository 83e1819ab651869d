"""Every error status over raw HTTP, in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``, plus API-key auth and the
request-size limit on a second server (``--api-key``, ``--max-request-bytes``)."""

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, SMALL_BODY_LIMIT

MODEL = "tiny"
MAX_MODEL_LEN = 1024  # tests/tiny_models.py: max_position_embeddings


def assert_error(response: httpx.Response, status: int, error_type: str, *, code=None, param=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    assert error["type"] == error_type
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=30, **kwargs)


CHAT = [{"role": "user", "content": "hi"}]

INVALID_COMPLETIONS = [
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "logit_bias": {"not-a-token": 5}}, "logit_bias"),
    ({"prompt": "x", "suffix": "and then"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "best_of": 2, "n": 1}, "best_of"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [99999999]}, "prompt"),
    ({"prompt": [[5, 6], [-1]]}, "prompt"),
    ({"prompt": "x", "logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"500": 1000}}, "logit_bias"),
    ({"prompt": "x", "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": [str(i) for i in range(17)]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
]


@pytest.mark.parametrize("body,param", INVALID_COMPLETIONS, ids=[f"{p}:{i}" for i, (_, p) in enumerate(INVALID_COMPLETIONS)])
def test_invalid_completion_fields_are_400(tiny_server, body, param):
    error = assert_error(post(tiny_server, "/v1/completions", {"model": MODEL, **body}), 400, "invalid_request_error")
    assert error["param"] is not None and error["param"].split(".")[0] == param, error
    if param in ("suffix", "best_of"):
        assert param in error["message"], "an unsupported field must be named in the message"


INVALID_CHAT = [
    ({"messages": CHAT, "temperature": 3}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": CHAT, "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
    ({"messages": CHAT, "tool_choice": "auto"}, "tool_choice"),
    (
        {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
        "response_format",
    ),
]


@pytest.mark.parametrize("body,param", INVALID_CHAT, ids=[f"{p}:{i}" for i, (_, p) in enumerate(INVALID_CHAT)])
def test_invalid_chat_fields_are_400(tiny_server, body, param):
    error = assert_error(post(tiny_server, "/v1/chat/completions", {"model": MODEL, **body}), 400, "invalid_request_error")
    assert error["param"] is not None and error["param"].split(".")[0] == param, error


def test_malformed_json_is_400(tiny_server):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        response = httpx.post(f"{tiny_server.base_url}{path}", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
        assert_error(response, 400, "invalid_request_error")
    not_an_object = httpx.post(f"{tiny_server.base_url}/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_error(not_an_object, 400, "invalid_request_error")


def test_context_overflow_names_both_numbers(tiny_server):
    prompt = [1000 + i for i in range(1000)]
    error = assert_error(
        post(tiny_server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 100}),
        400,
        "invalid_request_error",
        code="context_length_exceeded",
    )
    assert str(MAX_MODEL_LEN) in error["message"]
    assert "1100" in error["message"] and "1000" in error["message"] and "100" in error["message"]

    # A prompt longer than the window by itself.
    error = assert_error(
        post(tiny_server, "/v1/completions", {"model": MODEL, "prompt": prompt * 2, "max_tokens": 1}),
        400,
        "invalid_request_error",
        code="context_length_exceeded",
    )
    assert "2000" in error["message"] and str(MAX_MODEL_LEN) in error["message"]

    # One over the window in a list of prompts rejects the whole request.
    error = assert_error(
        post(tiny_server, "/v1/completions", {"model": MODEL, "prompt": [[5, 6, 7], prompt], "max_tokens": 100}),
        400,
        "invalid_request_error",
        code="context_length_exceeded",
    )

    # Chat: a long conversation plus max_tokens.
    messages = [{"role": "user", "content": "word " * 1000}]
    error = assert_error(
        post(tiny_server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 200}),
        400,
        "invalid_request_error",
        code="context_length_exceeded",
    )
    assert str(MAX_MODEL_LEN) in error["message"]

    # Exactly at the window is fine.
    ok = post(
        tiny_server,
        "/v1/completions",
        {"model": MODEL, "prompt": prompt[:1000], "max_tokens": MAX_MODEL_LEN - 1000, "temperature": 0, "logit_bias": {"2": 100}},
    )
    assert ok.status_code == 200, ok.text

    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=100)
    assert info.value.code == "context_length_exceeded"


def test_unknown_model_is_404(tiny_server):
    bodies = {
        "/v1/completions": {"model": "no-such-model", "prompt": "x", "max_tokens": 2},
        "/v1/chat/completions": {"model": "no-such-model", "messages": CHAT, "max_tokens": 2},
        "/tokenize": {"model": "no-such-model", "prompt": "x"},
        "/detokenize": {"model": "no-such-model", "tokens": [1, 2]},
    }
    for path, body in bodies.items():
        error = assert_error(post(tiny_server, path, body), 404, "not_found_error", code="model_not_found", param="model")
        assert "no-such-model" in error["message"]
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    # Streaming requests are validated before the stream starts.
    stream = post(tiny_server, "/v1/completions", {"model": "no-such-model", "prompt": "x", "stream": True})
    assert_error(stream, 404, "not_found_error", code="model_not_found")


def test_unknown_route_and_wrong_method(tiny_server):
    base = tiny_server.base_url
    assert_error(httpx.get(f"{base}/v1/nothing-here"), 404, "not_found_error")
    assert_error(httpx.post(f"{base}/v2/completions", json={}), 404, "not_found_error")
    # A route tokenstep lacks is named as not served, not a bare "Not Found".
    error = assert_error(httpx.post(f"{base}/v1/audio/speech", json={"model": MODEL, "input": "x"}), 404, "not_found_error")
    assert error["message"].startswith("POST /v1/audio/speech is not a route tokenstep serves"), error
    error = assert_error(httpx.get(f"{base}/v1/completions"), 405, "invalid_request_error")
    assert error["message"].startswith("GET /v1/completions: tokenstep serves /v1/completions with another method (POST"), error
    assert_error(httpx.get(f"{base}/v1/chat/completions"), 405, "invalid_request_error")
    assert_error(httpx.delete(f"{base}/v1/models"), 405, "invalid_request_error")


def test_tokenize_and_detokenize_errors(tiny_server):
    assert_error(post(tiny_server, "/tokenize", {"model": MODEL}), 400, "invalid_request_error")
    assert_error(post(tiny_server, "/tokenize", {"model": MODEL, "prompt": "x", "messages": CHAT}), 400, "invalid_request_error")
    assert_error(post(tiny_server, "/detokenize", {"model": MODEL, "tokens": [10**9]}), 400, "invalid_request_error", param="tokens")
    assert_error(post(tiny_server, "/detokenize", {"model": MODEL, "tokens": [-1]}), 400, "invalid_request_error", param="tokens")


def test_invalid_requests_never_reach_the_engine(tiny_server):
    """Validation happens before queueing: rejected requests leave no trace."""
    before = httpx.get(f"{tiny_server.base_url}/metrics").text
    post(tiny_server, "/v1/completions", {"model": MODEL, "prompt": [[1, 2], [1000 + i for i in range(1100)]], "max_tokens": 1})
    post(tiny_server, "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 9})
    after = httpx.get(f"{tiny_server.base_url}/metrics").text

    def prompt_tokens(text: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith("tokenstep_prompt_tokens_total ")).split()[1])

    assert prompt_tokens(after) == prompt_tokens(before)


# ----------------------------------------------------------- auth and size


AUTHED_ROUTES = [
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 1}),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"model": MODEL, "prompt": "x"}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [6004]}),
]


@pytest.mark.parametrize("method,path,body", AUTHED_ROUTES, ids=[path for _, path, _ in AUTHED_ROUTES])
def test_api_key_is_required(guarded_server, method, path, body):
    url = f"{guarded_server.base_url}{path}"
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
        {"Authorization": f"Bearer {API_KEY}x"},
    ):
        response = httpx.request(method, url, json=body, headers=headers, timeout=30)
        error = assert_error(response, 401, "authentication_error", code="invalid_api_key")
        assert API_KEY not in error["message"]
    ok = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert "error" not in ok.json()


def test_health_and_metrics_stay_open(guarded_server):
    assert httpx.get(f"{guarded_server.base_url}/health").status_code == 200
    metrics = httpx.get(f"{guarded_server.base_url}/metrics")
    assert metrics.status_code == 200 and "tokenstep_num_requests_running" in metrics.text


def test_sdk_with_and_without_the_key(guarded_server):
    good = openai.OpenAI(base_url=f"{guarded_server.base_url}/v1", api_key=API_KEY, max_retries=0)
    greedy = {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0, "extra_body": {"ignore_eos": True}}
    plain = good.completions.create(**greedy)
    assert plain.usage.completion_tokens == 2
    chunks = [chunk for chunk in good.completions.create(stream=True, **greedy) if chunk.choices]
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain.choices[0].text, "the keyed stream carries the same greedy text"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [m.id for m in good.models.list().data] == [MODEL]
    bad = openai.OpenAI(base_url=f"{guarded_server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True)


BIG_BODY = ('{"model": "tiny", "max_tokens": 1, "prompt": "' + "a" * 4096 + '"}').encode()
AUTH_JSON = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}


def test_oversized_body_is_413(guarded_server):
    url = f"{guarded_server.base_url}/v1/completions"
    assert len(BIG_BODY) > 2 * SMALL_BODY_LIMIT
    # Declared by Content-Length.
    assert_error(httpx.post(url, content=BIG_BODY, headers=AUTH_JSON, timeout=30), 413, "invalid_request_error", code="request_too_large")
    # Even without a key, the size check answers first; and a small body is fine.
    assert httpx.post(url, content=BIG_BODY, headers={"content-type": "application/json"}, timeout=30).status_code == 413
    small = httpx.post(url, json={"model": MODEL, "prompt": "a" * 100, "max_tokens": 1}, headers=AUTH_JSON, timeout=30)
    assert small.status_code == 200, small.text


def test_oversized_chunked_body_is_413(guarded_server):
    """No Content-Length (chunked transfer encoding): the limit must hold as the body streams in."""

    def chunks():
        for start in range(0, len(BIG_BODY), 512):
            yield BIG_BODY[start : start + 512]

    response = httpx.post(f"{guarded_server.base_url}/v1/completions", content=chunks(), headers=AUTH_JSON, timeout=30)
    assert_error(response, 413, "invalid_request_error", code="request_too_large")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("web_search_options", {}),
        ("reasoning_effort", "low"),
    ],
)
def test_chat_fields_asking_for_what_is_not_served_are_400_naming_the_field(tiny_server, field, value):
    """Through the OpenAI SDK: no answer that silently lacks what was asked for."""
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **{field: value})
    assert raised.value.body["param"] == field, raised.value.body
    # Text-only modalities ask for what is served.
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, modalities=["text"]).choices

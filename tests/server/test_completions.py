"""``POST /v1/completions`` and ``GET /health`` over the real engine on the
tiny random Llama (float32, CPU), in-process through httpx.

Tests in this module share one running app; the last tests check that all of
them together left no request and no KV block behind.
"""

import asyncio
import json
import time

import httpx
import pytest

from tests.server.asgi_stream import StreamingASGITransport
from tests.server.conftest import BASE_URL, MODEL_NAME
from tests.server.sse import DONE, parse_completion_stream, sse_data, stream_text

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "Once upon a time"
HANG_GUARD_S = 60  # only stops a wait from hanging: the disconnect tests count steps, not seconds


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


async def complete(client: httpx.AsyncClient, **body) -> dict:
    body.setdefault("prompt", PROMPT)
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def greedy(client: httpx.AsyncClient, **body) -> dict:
    body = {"temperature": 0, "ignore_eos": True, **body}
    return await complete(client, **body)


async def stream(client: httpx.AsyncClient, **body) -> list[dict]:
    body = {"prompt": PROMPT, "stream": True, **body}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_completion_stream(response.text)


async def wait_idle(engine_app, timeout: float = 2.0) -> None:
    """Poll until the engine holds no request and no KV block (aborts are
    applied by the engine loop, so they can lag a moment)."""
    core = engine_app.batcher.core
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not core.has_unfinished and engine_app.batcher.num_requests == 0 and core.scheduler.block_manager.num_used_blocks == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(
        f"engine not idle after {timeout}s: unfinished={core.has_unfinished}, "
        f"streams={engine_app.batcher.num_requests}, used_blocks={core.scheduler.block_manager.num_used_blocks}"
    )


# ---------------------------------------------------------------- health


async def test_health_is_200_once_serving(engine_app):
    response = await engine_app.client.get("/health")
    assert response.status_code == 200
    assert engine_app.batcher.is_running


# ---------------------------------------------------------------- JSON


async def test_string_prompt_has_openai_shape(engine_app):
    before = int(time.time())
    body = await greedy(engine_app.client, max_tokens=8)
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    assert isinstance(body["id"], str) and body["id"]
    assert body["object"] == "text_completion"
    assert isinstance(body["created"], int) and before - 1 <= body["created"] <= time.time() + 1
    assert body["model"] == MODEL_NAME
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert isinstance(choice["text"], str) and choice["text"]
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(engine_app.served.tokenizer(PROMPT).input_ids)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8}


async def test_token_id_prompt_matches_string_prompt(engine_app):
    token_ids = engine_app.served.tokenizer(PROMPT).input_ids
    by_text = await greedy(engine_app.client, max_tokens=8)
    by_ids = await greedy(engine_app.client, prompt=token_ids, max_tokens=8)
    nested = await greedy(engine_app.client, prompt=[token_ids], max_tokens=8)
    assert by_ids["object"] == "text_completion"
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert nested["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"] == by_text["usage"]
    assert by_ids["id"] != by_text["id"]


async def test_greedy_is_deterministic(engine_app):
    first = await complete(engine_app.client, temperature=0, max_tokens=12)
    second = await complete(engine_app.client, temperature=0, max_tokens=12)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["finish_reason"] == second["choices"][0]["finish_reason"]


@pytest.mark.parametrize("max_tokens", [1, 5, 23])
async def test_max_tokens_is_honoured(engine_app, max_tokens):
    body = await greedy(engine_app.client, max_tokens=max_tokens)
    assert body["usage"]["completion_tokens"] == max_tokens
    assert body["choices"][0]["finish_reason"] == "length"


async def test_default_max_tokens_is_16(engine_app):
    body = await greedy(engine_app.client)
    assert body["usage"]["completion_tokens"] == 16


# ---------------------------------------------------------------- SSE


async def test_stream_equals_non_streaming_text(engine_app):
    expected = await greedy(engine_app.client, max_tokens=20)
    chunks = await stream(engine_app.client, temperature=0, ignore_eos=True, max_tokens=20)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk["object"] == "text_completion"
        assert chunk["model"] == MODEL_NAME
        assert isinstance(chunk["created"], int)
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert stream_text(chunks) == expected["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    assert all(chunk.get("usage") is None for chunk in chunks)


async def test_stream_include_usage_adds_a_final_usage_chunk(engine_app):
    chunks = await stream(engine_app.client, temperature=0, ignore_eos=True, max_tokens=10, stream_options={"include_usage": True})
    *content, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    prompt_tokens = len(engine_app.served.tokenizer(PROMPT).input_ids)
    assert usage_chunk["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 10, "total_tokens": prompt_tokens + 10}
    assert content and content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(chunk.get("usage") is None for chunk in content)
    assert usage_chunk["id"] == content[0]["id"]


async def test_stream_raw_wire_format(engine_app):
    response = await engine_app.client.post(
        "/v1/completions", json={"prompt": PROMPT, "stream": True, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    )
    assert response.status_code == 200
    events = sse_data(response.text)
    assert events[-1] == DONE
    data_lines = [line for line in response.text.splitlines() if line.startswith("data:")]
    assert data_lines[-1].strip() == "data: [DONE]"


# ---------------------------------------------------------------- stop strings


def _cut_at_first(text: str, stop: str) -> str:
    return text[: text.index(stop)]


async def _reference_chunks(engine_app, max_tokens: int = 40) -> tuple[str, list[str]]:
    """Greedy text with ignore_eos, and its per-delta pieces from the stream."""
    full = (await greedy(engine_app.client, max_tokens=max_tokens))["choices"][0]["text"]
    chunks = await stream(engine_app.client, temperature=0, ignore_eos=True, max_tokens=max_tokens)
    pieces = [chunk["choices"][0]["text"] for chunk in chunks]
    assert "".join(pieces) == full
    return full, pieces


async def _check_stop(engine_app, full: str, stop, max_tokens: int = 40) -> None:
    stops = [stop] if isinstance(stop, str) else stop
    expected = min((full[: full.index(s)] for s in stops if s in full), key=len)
    body = await greedy(engine_app.client, max_tokens=max_tokens, stop=stop)
    choice = body["choices"][0]
    assert choice["text"] == expected
    assert choice["finish_reason"] == "stop"
    assert all(s not in choice["text"] for s in stops)
    assert body["usage"]["completion_tokens"] < max_tokens

    chunks = await stream(engine_app.client, temperature=0, ignore_eos=True, max_tokens=max_tokens, stop=stop)
    text = stream_text(chunks)
    assert text == expected
    assert all(s not in chunk["choices"][0]["text"] for chunk in chunks for s in stops)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stop_string_from_the_middle_cuts_the_text(engine_app):
    full, _ = await _reference_chunks(engine_app)
    middle = len(full) // 2
    stop = full[middle : middle + 4]
    assert full.index(stop) > 0
    await _check_stop(engine_app, full, stop)


async def test_stop_string_across_a_token_boundary(engine_app):
    full, pieces = await _reference_chunks(engine_app)
    # Two chars from the end of one delta and two from the start of the next:
    # the stop string straddles a token boundary.
    k = next(i for i in range(len(pieces) // 3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    assert full.index(stop) > 0
    await _check_stop(engine_app, full, stop)


async def test_stop_list_uses_the_earliest_match(engine_app):
    full, _ = await _reference_chunks(engine_app)
    early = full[len(full) // 3 : len(full) // 3 + 3]
    late = full[2 * len(full) // 3 : 2 * len(full) // 3 + 3]
    await _check_stop(engine_app, full, ["never-in-this-text-\u2603", late, early])


async def test_stop_reason_names_the_stop_string(engine_app):
    full, _ = await _reference_chunks(engine_app)
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    body = await greedy(engine_app.client, max_tokens=40, stop=[stop])
    assert body["choices"][0]["stop_reason"] == stop


async def test_partial_stop_match_at_the_end_is_flushed(engine_app):
    # The output ends with the first chars of a stop string that never completes:
    # the held-back text must still reach the client when the request ends.
    full, _ = await _reference_chunks(engine_app, max_tokens=20)
    stop = full[-2:] + "\u2603never"
    body = await greedy(engine_app.client, max_tokens=20, stop=stop)
    assert body["choices"][0]["text"] == full
    assert body["choices"][0]["finish_reason"] == "length"
    chunks = await stream(engine_app.client, temperature=0, ignore_eos=True, max_tokens=20, stop=stop)
    assert stream_text(chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_empty_stop_string_is_400(engine_app):
    response = await engine_app.client.post("/v1/completions", json={"prompt": PROMPT, "stop": ""})
    error = assert_openai_error(response, 400)
    assert error["param"] == "stop"


# ---------------------------------------------------------------- EOS and stop tokens


EOS_TOKEN_ID = 2  # the tiny model's eos_token_id


async def test_eos_finishes_with_stop(engine_app):
    body = await complete(engine_app.client, temperature=0, max_tokens=5, logit_bias={str(EOS_TOKEN_ID): 100})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == ""
    assert body["usage"]["completion_tokens"] == 1
    chunks = await stream(engine_app.client, temperature=0, max_tokens=5, logit_bias={str(EOS_TOKEN_ID): 100})
    assert stream_text(chunks) == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_ignore_eos_runs_to_max_tokens(engine_app):
    body = await complete(engine_app.client, temperature=0, max_tokens=5, ignore_eos=True, logit_bias={str(EOS_TOKEN_ID): 100})
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


async def test_min_tokens_holds_eos_back(engine_app):
    body = await complete(engine_app.client, temperature=0, max_tokens=8, min_tokens=3, logit_bias={str(EOS_TOKEN_ID): 100})
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4  # three forced tokens, then EOS
    greedy3 = (await greedy(engine_app.client, max_tokens=3))["choices"][0]["text"]
    assert body["choices"][0]["text"] == greedy3


async def test_stop_token_ids_finish_with_stop_reason(engine_app):
    body = await complete(engine_app.client, temperature=0, max_tokens=5, logit_bias={"100": 100}, stop_token_ids=[100])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == 100
    assert body["usage"]["completion_tokens"] == 1


# ---------------------------------------------------------------- seeded sampling


async def test_seeded_sampling_is_reproducible(engine_app):
    request = {"temperature": 1.0, "seed": 7, "max_tokens": 16, "ignore_eos": True}
    first = await complete(engine_app.client, **request)
    second = await complete(engine_app.client, **request)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


async def test_seeded_sampling_ignores_the_rest_of_the_batch(engine_app):
    request = {"temperature": 1.0, "seed": 7, "max_tokens": 16, "ignore_eos": True}
    alone = await complete(engine_app.client, **request)
    others = [
        complete(engine_app.client, prompt=f"Other prompt number {i}", temperature=1.0, max_tokens=24, ignore_eos=True) for i in range(3)
    ]
    batched, *_ = await asyncio.gather(complete(engine_app.client, **request), *others)
    assert batched["choices"][0]["text"] == alone["choices"][0]["text"]


async def test_concurrent_greedy_requests_match_sequential(engine_app):
    prompts = ["Hello there", "The quick brown fox", PROMPT, "1 2 3 4"]
    alone = [(await greedy(engine_app.client, prompt=p, max_tokens=10))["choices"][0]["text"] for p in prompts]
    together = await asyncio.gather(*(greedy(engine_app.client, prompt=p, max_tokens=10) for p in prompts))
    assert [body["choices"][0]["text"] for body in together] == alone


# ---------------------------------------------------------------- errors


async def test_invalid_temperature_is_400(engine_app):
    response = await engine_app.client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 3.0})
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "temperature"


async def test_missing_prompt_is_400(engine_app):
    response = await engine_app.client.post("/v1/completions", json={"max_tokens": 4})
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert "prompt" in (error["param"] or "") + error["message"]


async def test_malformed_json_is_400(engine_app):
    response = await engine_app.client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize("stream_flag", [False, True])
async def test_prompt_plus_max_tokens_over_context_is_400(engine_app, stream_flag):
    max_model_len = engine_app.served.max_model_len
    prompt = [100] * (max_model_len - 10)
    response = await engine_app.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 11, "stream": stream_flag})
    error = assert_openai_error(response, 400)
    assert "context length" in error["message"]
    assert str(max_model_len) in error["message"]


async def test_prompt_plus_max_tokens_exactly_at_context_is_accepted(engine_app):
    max_model_len = engine_app.served.max_model_len
    body = await greedy(engine_app.client, prompt=[100] * (max_model_len - 2), max_tokens=2)
    assert body["usage"]["total_tokens"] == max_model_len


async def test_suffix_is_400(engine_app):
    response = await engine_app.client.post("/v1/completions", json={"prompt": PROMPT, "suffix": "the end"})
    error = assert_openai_error(response, 400)
    assert error["param"] == "suffix" or "suffix" in error["message"]


@pytest.mark.parametrize("bad_token", [49152, 10**9, -1])
async def test_out_of_range_token_id_is_400(engine_app, bad_token):
    response = await engine_app.client.post("/v1/completions", json={"prompt": [1, 2, bad_token], "max_tokens": 2})
    error = assert_openai_error(response, 400)
    assert error["param"] == "prompt"


async def test_empty_prompt_is_400(engine_app):
    response = await engine_app.client.post("/v1/completions", json={"prompt": [], "max_tokens": 2})
    assert_openai_error(response, 400)


async def test_zero_max_tokens_is_400(engine_app):
    response = await engine_app.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    error = assert_openai_error(response, 400)
    assert error["param"] == "max_tokens"


async def test_known_or_omitted_model_is_accepted(engine_app):
    assert (await greedy(engine_app.client, model=MODEL_NAME, max_tokens=2))["model"] == MODEL_NAME
    assert (await greedy(engine_app.client, max_tokens=2))["model"] == MODEL_NAME


async def test_unknown_model_is_404(engine_app):
    response = await engine_app.client.post("/v1/completions", json={"prompt": PROMPT, "model": "no-such-model", "max_tokens": 2})
    error = assert_openai_error(response, 404)
    assert error["param"] == "model"


# ---------------------------------------------------------------- cleanup


async def test_client_disconnect_aborts_and_frees_blocks(engine_app):
    await wait_idle(engine_app)
    core = engine_app.batcher.core
    transport = StreamingASGITransport(engine_app.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as client:
        request = {"prompt": PROMPT, "stream": True, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        async with client.stream("POST", "/v1/completions", json=request) as response:
            assert response.status_code == 200
            first = None
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    first = json.loads(line[5:])
                    break
            assert first is not None and first["choices"][0]["finish_reason"] is None
            assert core.has_unfinished, "the request should still be running after its first event"
            assert core.scheduler.block_manager.num_used_blocks > 0
            steps_at_first_event = engine_app.batcher.num_steps
        # Leaving the block closes the stream: the app sees http.disconnect.
        await wait_idle(engine_app, timeout=HANG_GUARD_S)
    # Aborted, not run to completion: a handful of steps, not the other ~199.
    steps_after = engine_app.batcher.num_steps - steps_at_first_event
    assert steps_after < 50, f"{steps_after} steps ran after the first event"


async def test_non_streaming_client_disconnect_aborts(engine_app):
    await wait_idle(engine_app)
    core = engine_app.batcher.core
    max_tokens = 900  # far more steps than the abort takes
    transport = StreamingASGITransport(engine_app.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as client:
        request = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        pending = asyncio.create_task(client.post("/v1/completions", json=request))
        deadline = time.monotonic() + 5
        while not core.has_unfinished:
            assert time.monotonic() < deadline, "the request never started"
            await asyncio.sleep(0.005)
        steps_at_start = engine_app.batcher.num_steps
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await wait_idle(engine_app, timeout=HANG_GUARD_S)
    steps_after = engine_app.batcher.num_steps - steps_at_start
    assert steps_after < max_tokens // 2, f"{steps_after} steps ran after the client left"


async def test_engine_is_idle_after_a_mix_of_finishes(engine_app):
    """Whatever ran before (or nothing), requests ending every way (length,
    stop string, EOS, stream, 400, n > 1) leave no request and no block."""
    requests = [
        {"prompt": PROMPT, "max_tokens": 5},
        {"prompt": PROMPT, "max_tokens": 8, "stop": [" "]},
        {"prompt": PROMPT, "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 1},
        {"prompt": PROMPT, "max_tokens": 4, "stream": True},
        {"prompt": PROMPT, "max_tokens": 0},  # a 400 never reaches the engine
    ]
    responses = await asyncio.gather(*[engine_app.client.post("/v1/completions", json=body) for body in requests])
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 400]
    await wait_idle(engine_app)
    assert engine_app.batcher.core.scheduler.block_manager.num_used_blocks == 0
    assert not engine_app.batcher.core.has_unfinished
    assert engine_app.batcher.is_running
    response = await engine_app.client.get("/health")
    assert response.status_code == 200

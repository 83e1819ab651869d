"""``--request-timeout``: a request that runs too long ends with a 504 JSON
(non-streaming) or an error event then ``[DONE]`` (streaming), and its KV
blocks go back to the pool; requests within the limit are untouched."""

from pathlib import Path

import pytest

from model_runtime.loading.loader import LoadedModel
from server.settings import Settings
from tests.reliability.support import assert_openai_error, build_served, in_process, read_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")

TIMEOUT_S = 0.4
STEP_DELAY_S = 0.01  # 200 tokens take >= 2 s: five times the timeout
LONG = {"prompt": "a request that runs too long", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
CHAT = {"messages": [{"role": "user", "content": "run long"}], "max_tokens": 200, "temperature": 0, "ignore_eos": True}


@pytest.fixture
async def env(tiny_llama_dir: Path, tiny_weights: LoadedModel):
    served = build_served(tiny_llama_dir, tiny_weights, step_delay_s=STEP_DELAY_S)
    async with in_process(served, Settings(request_timeout=TIMEOUT_S)) as env:
        yield env


@pytest.mark.parametrize("path,payload", [("/v1/completions", LONG), ("/v1/chat/completions", CHAT)], ids=["completions", "chat"])
async def test_non_streaming_timeout_is_504_and_frees_blocks(env, path, payload):
    response = await env.client.post(path, json=payload)
    error = assert_openai_error(response, 504, code="request_timeout")
    assert error["type"] == "server_error" and "timeout" in error["message"]
    await env.wait_idle(timeout_s=1.0)  # aborted: not the other ~1.6 s of decoding


@pytest.mark.parametrize("path,payload", [("/v1/completions", LONG), ("/v1/chat/completions", CHAT)], ids=["completions", "chat"])
async def test_streaming_timeout_ends_with_an_error_event_then_done(env, path, payload):
    result = await read_stream(env.client, path, {**payload, "stream": True})
    assert result.status == 200
    result.assert_ended_properly()
    assert result.text, "tokens streamed before the timeout are delivered"
    [error] = result.errors
    assert error["code"] == 504 and error["type"] == "server_error"
    assert not result.finish_reasons
    await env.wait_idle(timeout_s=1.0)


async def test_requests_within_the_timeout_are_untouched(env):
    response = await env.client.post("/v1/completions", json={**LONG, "max_tokens": 5})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5

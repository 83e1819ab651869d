"""Limits: every size a client controls is bounded, and a request over a
bound is a clear 400 naming the field, answered before anything is queued."""

from pathlib import Path

import pytest

from model_runtime.loading.loader import LoadedModel
from server.protocol import MAX_LOGIT_BIAS, MAX_N, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from server.settings import Settings
from tests.reliability.support import assert_openai_error, build_served, in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

QUEUE_LEN, MAX_NUM_SEQS = 8, 4
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PROMPT = {"prompt": "hi"}

OVER_THE_LIMIT = [
    ("logit_bias", {"logit_bias": {str(token): 1.0 for token in range(MAX_LOGIT_BIAS + 1)}}),
    ("stop", {"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}),
    ("stop_token_ids", {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}),
    ("n", {"n": MAX_N + 1}),
    ("max_tokens", {"max_tokens": 10**12}),
    ("n", {"n": MAX_N, "prompt": ["a"] * 2}),  # 32 sequences > queue + running (12)
]


@pytest.fixture(scope="module")
async def env(tiny_llama_dir: Path, tiny_weights: LoadedModel):
    served = build_served(tiny_llama_dir, tiny_weights, max_queue_len=QUEUE_LEN, max_num_seqs=MAX_NUM_SEQS)
    async with in_process(served, Settings(max_queue_len=QUEUE_LEN)) as env:
        yield env


async def assert_rejected_before_queueing(env, path: str, body: dict, param: str) -> None:
    prompt_tokens = env.batcher.core.num_prompt_tokens_total
    error = assert_openai_error(await env.client.post(path, json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert env.batcher.core.num_prompt_tokens_total == prompt_tokens and env.batcher.num_requests == 0


@pytest.mark.parametrize("param,fields", OVER_THE_LIMIT, ids=[f"{param}-{i}" for i, (param, _) in enumerate(OVER_THE_LIMIT)])
async def test_completion_limits_are_400(env, param, fields):
    await assert_rejected_before_queueing(env, "/v1/completions", {**PROMPT, "max_tokens": 2, **fields}, param)


@pytest.mark.parametrize("param,fields", OVER_THE_LIMIT[:5], ids=[param for param, _ in OVER_THE_LIMIT[:5]])
async def test_chat_limits_are_400(env, param, fields):
    await assert_rejected_before_queueing(env, "/v1/chat/completions", {**CHAT, "max_tokens": 2, **fields}, param)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**PROMPT, "logprobs": 21}, "logprobs"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
async def test_logprobs_limits_are_400(env, path, body, param):
    await assert_rejected_before_queueing(env, path, body, param)


async def test_requests_at_the_limits_are_served(env):
    body = {
        **PROMPT,
        "max_tokens": 2,
        "logit_bias": {str(token): 0.0 for token in range(MAX_LOGIT_BIAS)},
        "stop_token_ids": list(range(3, 3 + MAX_STOP_TOKEN_IDS)),
        "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS)],
    }
    response = await env.client.post("/v1/completions", json={**body, "n": 2, "prompt": ["a", "b", "c"], "logprobs": 20})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 6

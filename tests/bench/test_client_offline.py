"""Stream parsing, failure capture, arrivals and the deadline, without a server
(``httpx.MockTransport`` plays the server)."""

import asyncio
import json

import httpx
import pytest

from bench.client import Target, build_payload, chunk_text, send_request, server_root
from bench.datasets import BenchPrompt, load_jsonl_prompts, random_text_prompts, random_token_prompts
from bench.runner import DEADLINE_ERROR, poisson_arrivals_s, run_requests

PROMPT = BenchPrompt([1, 2, 3], input_len=3, output_len=4)
TARGET = Target("http://bench.test", "completions", "tiny", ignore_eos=True)


def sse(*events: dict | str) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return (": ping\n\n" + "".join(lines)).encode()


def completion_chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


async def send_with(body: bytes, status: int = 200, target: Target = TARGET) -> tuple[object, dict]:
    seen: dict = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await send_request(client, target, PROMPT), seen


async def test_usage_chunk_gives_output_tokens() -> None:
    body = sse(
        completion_chunk("a"),
        completion_chunk(""),
        completion_chunk("b"),
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
        "[DONE]",
    )
    result, payload = await send_with(body)
    assert result.is_success and result.error == ""
    assert result.output_tokens == 4 and result.input_tokens == 3
    assert len(result.itls_s) == 1  # two content chunks; the empty one is not a token
    assert 0 < result.ttft_s <= result.e2e_s
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
    assert payload["max_tokens"] == 4 and payload["ignore_eos"] is True and payload["prompt"] == [1, 2, 3] and payload["model"] == "tiny"


async def test_without_usage_counts_content_chunks() -> None:
    result, _ = await send_with(sse(completion_chunk("a"), completion_chunk("b"), completion_chunk("c"), "[DONE]"))
    assert result.is_success and result.output_tokens == 3 and len(result.itls_s) == 2


async def test_chat_role_chunk_is_not_a_token() -> None:
    chat = Target("http://bench.test", "chat", None)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    content = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    result, payload = await send_with(sse(role, content, content, "[DONE]"), target=chat)
    assert result.is_success and result.output_tokens == 2 and len(result.itls_s) == 1
    assert payload["messages"] == [{"role": "user", "content": [1, 2, 3]}] and "model" not in payload


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (json.dumps({"error": {"message": "model 'x' not found"}}).encode(), 404, "HTTP 404: model 'x' not found"),
        (b"oops", 500, "HTTP 500: oops"),
        (sse(completion_chunk("a"), {"error": {"message": "engine died"}}), 200, "stream error: engine died"),
        (sse("[DONE]"), 200, "stream ended without a content chunk"),
        (b"data: {not json\n\n", 200, "JSONDecodeError"),
    ],
)
async def test_failures_become_errors(body: bytes, status: int, expected: str) -> None:
    result, _ = await send_with(body, status)
    assert not result.is_success
    assert expected in result.error


async def test_connection_error_is_a_result() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        result = await send_request(client, TARGET, PROMPT)
    assert not result.is_success and result.error == "ConnectError: Connection refused"


async def test_deadline_cancels_and_counts_failed() -> None:
    """Requests still open at the deadline are cancelled (the hung server
    handlers see it) and counted as failed; requests never sent count too."""
    num_hung, num_cancelled = [0], [0]

    async def hang(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["prompt"] == [0]:
            return httpx.Response(200, content=sse(completion_chunk("x"), "[DONE]"))
        num_hung[0] += 1
        try:
            await asyncio.Event().wait()  # never answers
        except asyncio.CancelledError:
            num_cancelled[0] += 1
            raise
        raise AssertionError("unreachable")

    prompts = [BenchPrompt([0], 1, 1)] + [PROMPT] * 5
    # The outer timeout only turns a deadline that never fires into a failure instead of a hang.
    results, _ = await asyncio.wait_for(run_requests(TARGET, prompts, 2, float("inf"), 0, 0.5, False, httpx.MockTransport(hang)), 60)
    assert results[0].is_success
    assert [r.error for r in results[1:]] == [DEADLINE_ERROR] * 5
    assert num_hung[0] == 2 and num_cancelled[0] == 2, "two hung at the concurrency limit of 2; both cancelled"


def test_poisson_arrivals() -> None:
    assert poisson_arrivals_s(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    arrivals = poisson_arrivals_s(4000, 10.0, 1)
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert arrivals[-1] / 3999 == pytest.approx(0.1, rel=0.1)  # mean gap 1 / rate
    assert poisson_arrivals_s(10, 10.0, 1) == poisson_arrivals_s(10, 10.0, 1)


def test_prompt_builders(tmp_path) -> None:
    token_prompts = random_token_prompts([5, 6, 7], 4, 32, 8, seed=1)
    assert all(len(p.prompt) == 32 and set(p.prompt) <= {5, 6, 7} and p.output_len == 8 for p in token_prompts)
    assert token_prompts == random_token_prompts([5, 6, 7], 4, 32, 8, seed=1)
    text_prompts = random_text_prompts(2, 26, 8, seed=1, tokens_per_word=1.3)
    assert all(isinstance(p.prompt, str) and len(p.prompt.split()) == 20 for p in text_prompts)
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "one two three"}\n\n{"prompt": [1, 2], "output_len": 3}\n')
    rows = load_jsonl_prompts(path, 3, output_len=9, tokens_per_word=1.0)
    assert [(p.prompt, p.input_len, p.output_len) for p in rows] == [("one two three", 3, 9), ([1, 2], 2, 3), ("one two three", 3, 9)]


def test_small_helpers() -> None:
    assert server_root("http://h:8000/v1/") == "http://h:8000"
    assert chunk_text({"choices": [{"delta": {"reasoning_content": "r"}}]}) == "r"
    assert chunk_text({"choices": [], "usage": {}}) == ""
    assert "ignore_eos" not in build_payload(Target("http://h", "completions", "m"), PROMPT)


def test_extra_body_goes_to_an_even_share_of_requests() -> None:
    from bench.cli import with_extra_body

    extra = {"guided_choice": ["a", "b"]}
    prompts = with_extra_body([PROMPT] * 8, extra, 0.5)
    assert [p.extra_body is not None for p in prompts] == [False, True] * 4
    payload = build_payload(Target("http://h", "completions", "m"), prompts[1])
    assert payload["guided_choice"] == ["a", "b"] and payload["stream"] is True
    assert all(p.extra_body == extra for p in with_extra_body([PROMPT] * 3, extra, 1.0))
    assert with_extra_body([PROMPT] * 3, None, 1.0) == [PROMPT] * 3

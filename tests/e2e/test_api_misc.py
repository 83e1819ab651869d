"""``/v1/models``, ``/tokenize``, ``/detokenize``, the raw SSE wire format,
a replay of what ``vllm bench serve --backend openai`` sends, and
disconnects observed through ``/metrics``, against a real ``tokenstep serve``."""

import asyncio
import json
import re
import time

import httpx
import openai

MODEL = "tiny"


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def scrape(server) -> str:
    response = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def wait_until_idle(server, timeout_s: float = 10) -> str:
    """Poll /metrics until nothing runs, nothing waits and no KV block is held; return the scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(server)
        state = [
            metric(text, name)
            for name in ("tokenstep_num_requests_running", "tokenstep_num_requests_waiting", "tokenstep_kv_cache_usage_ratio")
        ]
        if state == [0.0, 0.0, 0.0]:
            return text
        assert time.monotonic() < deadline, f"requests or KV blocks still held {timeout_s} s later: {state}"
        time.sleep(0.1)


def sse_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking its framing on the way."""
    assert body.endswith("\n\n"), "the stream must end with a blank line"
    events = body[:-2].split("\n\n")
    payloads = []
    for event in events:
        lines = [line for line in event.split("\n") if not line.startswith(":")]  # comments (pings)
        if not lines:
            continue
        assert len(lines) == 1, f"one data line per event, got {event!r}"
        assert lines[0].startswith("data: "), f"event line must start with 'data: ': {lines[0]!r}"
        payloads.append(lines[0][len("data: ") :])
    return payloads


# --------------------------------------------------------------- /v1/models


def test_models_card(tiny_server):
    body = httpx.get(f"{tiny_server.base_url}/v1/models").json()
    assert body["object"] == "list"
    assert len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == MODEL
    assert card["object"] == "model"
    assert isinstance(card["created"], int) and card["created"] > 1_600_000_000
    assert isinstance(card["owned_by"], str) and card["owned_by"]
    assert isinstance(card["root"], str) and card["root"]
    assert card["max_model_len"] == 1024

    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL]
    assert models.data[0].owned_by == card["owned_by"]


def test_default_model_is_named_smollm2(default_server):
    card = httpx.get(f"{default_server.base_url}/v1/models").json()["data"][0]
    assert card["id"] == "smollm2-135m-instruct"
    assert card["root"]
    assert card["max_model_len"] >= 2048


def test_the_default_serves_the_shipped_files_blocks_with_int16_activations(default_server):
    """No flags: the embedded model's own Q4_1 blocks (and its Q8_0 head),
    with int16 activations, on tokenstep's kernels."""
    (line,) = [line for line in default_server.log_path.read_text().splitlines() if "serving: " in line]
    assert "weights the GGUF file's own blocks (1 Q8_0 + 210 Q4_1)" in line, line
    assert "activations int16;" in line and "kernels C++ built for" in line, line


# ------------------------------------------------------- tokenize/detokenize


def test_tokenize_prompt_and_messages_and_detokenize_round_trip(tiny_server):
    base = tiny_server.base_url
    text = "Tokenize me, please: 1234 héllo"
    by_prompt = httpx.post(f"{base}/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert set(by_prompt) >= {"tokens", "count", "max_model_len"}
    assert by_prompt["count"] == len(by_prompt["tokens"]) > 0
    assert by_prompt["max_model_len"] == 1024
    assert all(isinstance(token, int) for token in by_prompt["tokens"])
    back = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": by_prompt["tokens"]}).json()
    assert back == {"prompt": text}

    messages = [{"role": "user", "content": "hello"}]
    by_messages = httpx.post(f"{base}/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert by_messages["count"] == len(by_messages["tokens"]) > by_prompt["count"] // 4
    rendered = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": by_messages["tokens"]}).json()["prompt"]
    assert "<|im_start|>user\nhello<|im_end|>" in rendered

    # The completion route sees the same prompt length.
    completion = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == by_prompt["count"]

    # Model is optional, as in vLLM.
    assert httpx.post(f"{base}/tokenize", json={"prompt": text}).json()["tokens"] == by_prompt["tokens"]


def test_openapi_describes_every_route_and_field(tiny_server):
    schema = httpx.get(f"{tiny_server.base_url}/openapi.json").json()
    paths = schema["paths"]
    for path, method in [
        ("/v1/completions", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/tokenize", "post"),
        ("/detokenize", "post"),
        ("/health", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths.get(path, {}), f"{method.upper()} {path} missing from /openapi.json"
    components = schema["components"]["schemas"]
    completion_fields = set(components["CompletionRequest"]["properties"])
    extensions = {"top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "skip_special_tokens"}
    assert {
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "echo",
        "logprobs",
        "seed",
        "logit_bias",
        "stream",
        "stream_options",
        "user",
    } | extensions <= completion_fields
    chat_fields = set(components["ChatCompletionRequest"]["properties"])
    assert {
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
    } | extensions <= chat_fields
    docs = httpx.get(f"{tiny_server.base_url}/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]


# ------------------------------------------------------------ SSE wire format


def test_sse_wire_format_completions_and_chat(tiny_server):
    requests = [
        (
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": "wire format",
                "max_tokens": 5,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "wire"}],
                "max_tokens": 5,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
    ]
    for path, body in requests:
        with httpx.stream("POST", f"{tiny_server.base_url}{path}", json=body, timeout=30) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = response.read().decode()
        assert "\r" not in raw
        payloads = sse_events(raw)
        assert payloads[-1] == "[DONE]"
        assert payloads.count("[DONE]") == 1
        chunks = [json.loads(payload) for payload in payloads[:-1]]
        assert all("error" not in chunk for chunk in chunks)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
        assert all(chunk["choices"] for chunk in chunks[:-1])


# ----------------------------------------------------------- vllm bench serve


def test_vllm_bench_serve_openai_backend_replay(tiny_server):
    """Exactly the request ``vllm bench serve --backend openai`` sends, parsed as it does."""
    base = tiny_server.base_url
    models = httpx.get(f"{base}/v1/models").json()
    assert models["data"][0]["root"]
    model_name = models["data"][0]["id"]
    payload = {
        "model": model_name,
        "prompt": "Benchmark prompt: " + "lorem ipsum " * 20,
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 16,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    headers = {"Authorization": "Bearer EMPTY", "User-Agent": "Benchmark"}
    generated, usage, ttft_seen = "", None, False
    with httpx.stream("POST", f"{base}/v1/completions", json=payload, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            line = line.strip()
            if not line:
                continue
            chunk = line.removeprefix("data: ")
            if chunk == "[DONE]":
                continue
            data = json.loads(chunk)
            if choices := data.get("choices"):
                text = choices[0].get("text")
                ttft_seen = True
                generated += text or ""
            elif data.get("usage"):
                usage = data["usage"]
    assert ttft_seen
    assert usage is not None and usage["completion_tokens"] == 16
    prompt_ids = httpx.post(f"{base}/tokenize", json={"model": model_name, "prompt": payload["prompt"]}).json()["tokens"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert generated


# ----------------------------------------------------- disconnect + /metrics


def test_disconnected_streams_free_their_requests(tiny_server):
    base = tiny_server.base_url
    before = scrape(tiny_server)
    ttft_before = metric(before, "tokenstep_time_to_first_token_seconds_count")
    e2e_before = metric(before, "tokenstep_e2e_request_latency_seconds_count")
    generated_before = metric(before, "tokenstep_generation_tokens_total")
    max_tokens, num_complete, num_dropped = 200, 3, 3

    async def one(client: httpx.AsyncClient, index: int, drop: bool) -> int | None:
        body = {
            "model": MODEL,
            "prompt": f"stream number {index}",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            usage = None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if drop and events == 2:
                    return None  # leaving the block closes the connection mid-stream
                payload = line[len("data: ") :]
                if payload != "[DONE]":
                    usage = json.loads(payload).get("usage") or usage
            return usage["completion_tokens"]

    async def run_all() -> list[int | None]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=16)) as client:
            return await asyncio.gather(*[one(client, i, drop=i % 2 == 1) for i in range(num_complete + num_dropped)])

    results = asyncio.run(run_all())
    assert [r for r in results if r is not None] == [max_tokens] * num_complete
    assert results.count(None) == num_dropped

    text = wait_until_idle(tiny_server)

    assert metric(text, "tokenstep_time_to_first_token_seconds_count") >= ttft_before + num_complete + num_dropped
    assert metric(text, "tokenstep_e2e_request_latency_seconds_count") >= e2e_before + num_complete
    generated = metric(text, "tokenstep_generation_tokens_total") - generated_before
    assert generated >= num_complete * max_tokens
    # The dropped requests were aborted, not run to their 200 tokens.
    assert generated < num_complete * max_tokens + num_dropped * max_tokens // 2, f"dropped streams kept generating ({generated} tokens)"


def test_metrics_exposition(tiny_server):
    response = httpx.get(f"{tiny_server.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "tokenstep_num_requests_running",
        "tokenstep_num_requests_waiting",
        "tokenstep_kv_cache_usage_ratio",
        "tokenstep_prompt_tokens_total",
        "tokenstep_generation_tokens_total",
        "tokenstep_num_preemptions_total",
        "tokenstep_prefix_cache_queries_total",
        "tokenstep_prefix_cache_hits_total",
        "tokenstep_engine_steps_total",
        "tokenstep_engine_step_seconds_total",
    ):
        metric(response.text, name)
    for histogram in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time"):
        assert f"# TYPE tokenstep_{histogram}_seconds histogram" in response.text
        metric(response.text, f"tokenstep_{histogram}_seconds_count")


def test_disconnected_non_streaming_request_is_aborted(tiny_server):
    base = tiny_server.base_url
    generated_before = metric(scrape(tiny_server), "tokenstep_generation_tokens_total")
    max_tokens = 900  # ~4 s of decoding on CPU if it were not aborted
    body = {"model": MODEL, "prompt": "a long non-streaming request", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    try:
        httpx.post(f"{base}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    except httpx.ReadTimeout:
        pass  # the client gives up and closes the connection
    else:
        raise AssertionError("the request finished before the client left; make it longer")
    text = wait_until_idle(tiny_server)
    generated = metric(text, "tokenstep_generation_tokens_total") - generated_before
    assert generated < max_tokens * 2 // 3, f"the abandoned request kept generating ({generated} tokens)"

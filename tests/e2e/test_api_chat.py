"""``POST /v1/chat/completions`` through the official OpenAI SDK (sync and
async, streaming and not) against a real ``tokenstep serve``.

Most tests use the tiny random model (structure, counts, equality between
runs); the real SmolLM2 checks that the chat template gives a real answer.
"""

import math

import httpx
import openai

MODEL = "tiny"
BOS = 1  # SmolLM2's bos_token <|im_start|>
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something."},
    {"role": "assistant", "content": "Something."},
    {"role": "user", "content": "Again, please."},
]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def chat_text(client, messages=MESSAGES, max_tokens: int = 8, **kwargs) -> str:
    kwargs = {**GREEDY, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, **kwargs).choices[0].message.content


def test_chat_roles_and_content_parts(tiny_server):
    client = client_for(tiny_server)
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, **GREEDY)
    assert response.object == "chat.completion" and response.model == MODEL and response.id
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6

    # Content as a list of text parts renders exactly like the joined string.
    as_parts = [dict(m) for m in MESSAGES]
    as_parts[3] = {"role": "user", "content": [{"type": "text", "text": "Again, "}, {"type": "text", "text": "please."}]}
    parts = client.chat.completions.create(model=MODEL, messages=as_parts, max_tokens=6, **GREEDY)
    assert parts.usage.prompt_tokens == response.usage.prompt_tokens
    assert parts.choices[0].message.content == choice.message.content


def test_developer_role_and_tool_choice_none(tiny_server):
    client = client_for(tiny_server)
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi."}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, tool_choice="none", **GREEDY)
    assert response.usage.completion_tokens == 3


def test_max_tokens_and_max_completion_tokens(tiny_server):
    client = client_for(tiny_server)
    old = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, **GREEDY)
    new = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, **GREEDY)
    assert old.usage.completion_tokens == new.usage.completion_tokens == 5
    assert old.choices[0].message.content == new.choices[0].message.content
    assert old.choices[0].finish_reason == new.choices[0].finish_reason == "length"


def test_omitted_max_tokens_runs_to_the_context_window(tiny_server):
    """No max tokens: the rest of the context window (as vLLM). A random model
    almost never samples EOS, so a long prompt lets it hit the window fast."""
    client = client_for(tiny_server)
    max_model_len = httpx.get(f"{tiny_server.base_url}/v1/models").json()["data"][0]["max_model_len"]
    messages = [{"role": "user", "content": "word " * (max_model_len - 80)}]
    response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    usage = response.usage
    assert usage.prompt_tokens < max_model_len
    assert response.choices[0].finish_reason in ("stop", "length")
    if response.choices[0].finish_reason == "length":
        assert usage.prompt_tokens + usage.completion_tokens == max_model_len
    else:
        assert usage.prompt_tokens + usage.completion_tokens <= max_model_len


def test_default_model_answers_without_max_tokens(default_server):
    """The real SmolLM2 through its chat template, no max tokens: it ends by EOS."""
    client = client_for(default_server)
    messages = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    response = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert response.usage.completion_tokens < 64
    streamed = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == choice.message.content


def test_logprobs_and_top_logprobs(tiny_server):
    client = client_for(tiny_server)
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    for item in content:
        assert item.logprob <= 0.0
        assert item.bytes == list(item.token.encode("utf-8"))
        assert 1 <= len(item.top_logprobs) <= 3
        tops = [(top.token, top.logprob) for top in item.top_logprobs]
        assert [lp for _, lp in tops] == sorted((lp for _, lp in tops), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert tops[0][0] == item.token
        assert math.isclose(tops[0][1], item.logprob, abs_tol=1e-4)
    if "\ufffd" not in "".join(item.token for item in content):
        assert "".join(item.token for item in content) == response.choices[0].message.content

    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, **GREEDY)
    assert plain.choices[0].logprobs is None
    only = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True, **GREEDY)
    assert len(only.choices[0].logprobs.content) == 3
    assert all(item.top_logprobs == [] for item in only.choices[0].logprobs.content)

    # Streamed logprobs equal the non-streamed ones.
    streamed = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, stream=True, **GREEDY
    ):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed += choice.logprobs.content
    assert [item.token for item in streamed] == [item.token for item in content]


def test_n_seed_and_stop(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(n=3, seed=21, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" for c in first.choices)
    assert first.usage.completion_tokens == 24
    again = client.chat.completions.create(n=3, seed=21, **kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    assert len({c.message.content for c in first.choices}) > 1

    full = chat_text(client, max_tokens=16)
    assert len(full) > 12
    stop = full[8:11]
    stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stop=[stop], **GREEDY).choices[0]
    assert stopped.message.content == full[: full.index(stop)]
    assert stopped.finish_reason == "stop"
    single = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stop=stop, **GREEDY).choices[0]
    assert single.message.content == stopped.message.content


def test_extensions_and_penalties_are_accepted(tiny_server):
    client = client_for(tiny_server)
    greedy = chat_text(client, max_tokens=6)
    extended = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": True, "min_tokens": 2, "skip_special_tokens": True},
    )
    assert extended.choices[0].message.content == greedy
    assert extended.usage.completion_tokens == 6


def test_stream_deltas_role_content_finish_and_usage(tiny_server):
    client = client_for(tiny_server)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in with_choices[1:])
    content_chunks = with_choices[1:-1]
    assert content_chunks and all(chunk.choices[0].delta.content for chunk in content_chunks)
    assert all(chunk.choices[0].finish_reason is None for chunk in with_choices[:-1])
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in with_choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 8


def test_stream_n_choices_each_start_with_role(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=6, n=2, temperature=1.0, seed=8, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    texts: dict[int, str] = {}
    roles: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.index not in roles:
                roles[choice.index] = choice.delta.role
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert finish == {0: "length", 1: "length"}
    assert texts == {c.index: c.message.content for c in whole.choices}


async def test_async_chat_stream_and_non_stream(tiny_server):
    aclient = openai.AsyncOpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    try:
        whole = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=7, **GREEDY)
        stream = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=7, stream=True, **GREEDY)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text == whole.choices[0].message.content
    finally:
        await aclient.close()


def test_response_format_text_is_plain_generation(tiny_server):
    client = client_for(tiny_server)
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, response_format={"type": "text"}, **GREEDY)
    assert ok.usage.completion_tokens == 2
    assert ok.choices[0].message.content == chat_text(client, max_tokens=2)


def test_chat_prompt_is_the_tokenized_template_without_doubled_bos(tiny_server):
    client = client_for(tiny_server)
    tokenized = httpx.post(f"{tiny_server.base_url}/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, **GREEDY)
    assert response.usage.prompt_tokens == tokenized["count"] == len(tokenized["tokens"])
    ids = tokenized["tokens"]
    assert ids[:2] != [BOS, BOS], "the rendered template was tokenized with special tokens added again"
    # The template's own special tokens are there exactly as rendered.
    assert ids[0] == BOS
    rendered = httpx.post(f"{tiny_server.base_url}/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"]
    assert rendered.startswith("<|im_start|>system\nYou are terse.")
    assert rendered.endswith("<|im_start|>assistant\n")


def test_default_model_streams_multibyte_text_without_broken_characters(default_server):
    """CJK characters span several byte-level tokens: deltas hold them back until complete."""
    client = client_for(default_server)
    kwargs = dict(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Write the word hello in Chinese characters, Japanese and Korean."}],
        max_tokens=28,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs)
    deltas = [
        chunk.choices[0].delta.content
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices and chunk.choices[0].delta.content
    ]
    assert "".join(deltas) == whole.choices[0].message.content
    assert not any("\ufffd" in delta for delta in deltas[:-1]), deltas
    if any(ord(ch) > 0x2E80 for ch in whole.choices[0].message.content):
        assert len(deltas) < whole.usage.completion_tokens, "multi-token characters should arrive as one delta"

"""The official OpenAI SDK against a real ``tokenstep serve`` (uvicorn)."""

import asyncio

import openai
import pytest


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_completion_and_stream_agree(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model="tiny", prompt="Hello there", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    completion = client.completions.create(**kwargs)
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    chunks = list(client.completions.create(stream=True, **kwargs))
    streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert streamed == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_bad_request_is_openai_error(tiny_server):
    client = client_for(tiny_server)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=5)
    assert "temperature" in str(info.value)


def test_concurrent_streams_match_solo_runs(tiny_server):
    """16 concurrent greedy streams each produce exactly their solo text."""
    client = client_for(tiny_server)
    prompts = [f"request {i} " + "word " * (i * 7) for i in range(16)]
    solo = [
        client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        for p in prompts
    ]

    async def stream_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(
                model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}
            )
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

        try:
            return await asyncio.gather(*[one(p) for p in prompts])
        finally:
            await aclient.close()

    assert asyncio.run(stream_all()) == solo


def test_default_model_answers_and_batches(default_server, tokenizer):
    """The embedded SmolLM2 answers a factual question, alone and in a batch."""
    client = client_for(default_server)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    alone = client.completions.create(model="smollm2-135m-instruct", prompt=prompt_ids, max_tokens=24, temperature=0).choices[0].text
    assert "Paris" in alone

    async def batched() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0)
        others = [f"Write a sentence about the number {i}." for i in range(7)]
        calls = [aclient.completions.create(model="smollm2-135m-instruct", prompt=prompt_ids, max_tokens=24, temperature=0)]
        calls += [aclient.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=24, temperature=0) for p in others]
        try:
            return [r.choices[0].text for r in await asyncio.gather(*calls)]
        finally:
            await aclient.close()

    assert asyncio.run(batched())[0] == alone

"""``POST /v1/completions`` through the official OpenAI SDK (sync and async,
streaming and not) against a real ``tokenstep serve`` of the tiny model.

The tiny model has random weights, so these tests assert structure, token
counts, equality between runs and logprob consistency, never the text itself.
"""

import asyncio
import codecs
import math
import re

import httpx
import openai
import pytest

MODEL = "tiny"
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
FORCED_TOKEN = 500  # any ordinary (non-special) token id of the SmolLM2 vocabulary
EOS = 2


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def async_client_for(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def tokenize(server, prompt: str) -> list[int]:
    return httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"]


def detokenize(server, tokens: list[int]) -> str:
    return httpx.post(f"{server.base_url}/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]


def greedy_text(client: openai.OpenAI, prompt, max_tokens: int = 8, **extra) -> str:
    body = {"ignore_eos": True, **extra}
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body).choices[0].text


def stream_choices(stream) -> tuple[dict[int, str], dict[int, str | None], list]:
    """Concatenated text and last finish_reason per index, plus the raw chunks."""
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


# --------------------------------------------------------------------- prompts


def test_prompt_forms_give_one_choice_per_prompt_in_order(tiny_server):
    client = client_for(tiny_server)
    prompts = ["The first prompt", "A second, different one", "third"]
    solo = [greedy_text(client, p, 6) for p in prompts]
    assert len(set(solo)) == 3, "the test needs prompts with distinct continuations"
    ids = [tokenize(tiny_server, p) for p in prompts]

    # A string.
    single = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=6, **GREEDY)
    assert single.object == "text_completion" and single.model == MODEL and single.id
    assert [c.index for c in single.choices] == [0]
    assert single.usage.prompt_tokens == len(ids[0])
    assert single.usage.completion_tokens == 6
    assert single.usage.total_tokens == len(ids[0]) + 6

    # A list of strings.
    many = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == solo
    assert many.usage.prompt_tokens == sum(len(i) for i in ids)
    assert many.usage.completion_tokens == 18

    # A list of token ids is one prompt, the same as its text.
    by_ids = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=6, **GREEDY)
    assert [c.index for c in by_ids.choices] == [0]
    assert by_ids.choices[0].text == solo[1]
    assert by_ids.usage.prompt_tokens == len(ids[1])

    # A list of lists of token ids.
    lists = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, **GREEDY)
    assert [c.index for c in lists.choices] == [0, 1, 2]
    assert [c.text for c in lists.choices] == solo


def test_n_choices_are_indexed_prompt_times_n_plus_i(tiny_server):
    client = client_for(tiny_server)
    prompts = ["alpha beta", "gamma delta"]
    solo = [greedy_text(client, p, 5) for p in prompts]
    response = client.completions.create(model=MODEL, prompt=prompts, n=3, max_tokens=5, **GREEDY)
    assert [c.index for c in response.choices] == list(range(6))
    for prompt_index in range(2):
        for i in range(3):
            assert response.choices[prompt_index * 3 + i].text == solo[prompt_index]
    assert response.usage.completion_tokens == 30

    sampled = client.completions.create(model=MODEL, prompt=prompts[0], n=4, max_tokens=8, temperature=1.0, seed=11)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert len({c.text for c in sampled.choices}) > 1, "n samples of a seeded request must not all be identical"
    again = client.completions.create(model=MODEL, prompt=prompts[0], n=4, max_tokens=8, temperature=1.0, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]


# ----------------------------------------------------------------- max_tokens


def test_max_tokens_and_default_of_16(tiny_server):
    client = client_for(tiny_server)
    for max_tokens in (1, 7):
        response = client.completions.create(model=MODEL, prompt="count me", max_tokens=max_tokens, **GREEDY)
        assert response.usage.completion_tokens == max_tokens
        assert response.choices[0].finish_reason == "length"
    # OpenAI's default max_tokens for completions is 16.
    raw = httpx.post(
        f"{tiny_server.base_url}/v1/completions",
        json={"model": MODEL, "prompt": "count me", "temperature": 0, "ignore_eos": True},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    assert raw.json()["usage"]["completion_tokens"] == 16


# ------------------------------------------------------------------- sampling


def test_temperature_top_p_and_seed_are_reproducible(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.8, top_p=0.9, extra_body={"ignore_eos": True})
    first = client.completions.create(seed=1234, **kwargs).choices[0].text
    second = client.completions.create(seed=1234, **kwargs).choices[0].text
    assert first == second
    others = {client.completions.create(seed=seed, **kwargs).choices[0].text for seed in (1, 2, 3)}
    assert len(others | {first}) > 1, "different seeds should give different samples"


async def test_seeded_request_is_reproducible_inside_a_concurrent_batch(tiny_server):
    aclient = async_client_for(tiny_server)
    try:
        kwargs = dict(model=MODEL, prompt="seeded under load", max_tokens=10, temperature=1.0, seed=77, extra_body={"ignore_eos": True})
        alone = (await aclient.completions.create(**kwargs)).choices[0].text
        noise = [
            aclient.completions.create(
                model=MODEL, prompt=f"noise {i} " * (i + 1), max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True}
            )
            for i in range(5)
        ]
        results = await asyncio.gather(aclient.completions.create(**kwargs), *noise)
        assert results[0].choices[0].text == alone
    finally:
        await aclient.close()


@pytest.mark.parametrize("extension", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}], ids=["top_k=1", "min_p=1", "tiny_top_p"])
def test_truncating_samplers_at_the_limit_equal_greedy(tiny_server, extension):
    """top_k=1, min_p=1 and a tiny top_p keep only the argmax token, whatever the temperature."""
    client = client_for(tiny_server)
    greedy = greedy_text(client, "sampling filters", 10)
    extra = {key: value for key, value in extension.items() if key != "top_p"}
    response = client.completions.create(
        model=MODEL,
        prompt="sampling filters",
        max_tokens=10,
        temperature=1.0,
        top_p=extension.get("top_p", 1.0),
        extra_body={"ignore_eos": True, **extra},
    )
    assert response.choices[0].text == greedy


def test_logit_bias_forces_a_token(tiny_server):
    client = client_for(tiny_server)
    response = client.completions.create(model=MODEL, prompt="anything", max_tokens=4, temperature=0, logit_bias={str(FORCED_TOKEN): 100})
    assert response.choices[0].text == detokenize(tiny_server, [FORCED_TOKEN] * 4)
    sampled = client.completions.create(model=MODEL, prompt="anything", max_tokens=4, temperature=1.0, logit_bias={str(FORCED_TOKEN): 100})
    assert sampled.choices[0].text == detokenize(tiny_server, [FORCED_TOKEN] * 4)


def _forced_count(server, sampling: dict) -> int:
    """How often a moderately (+8) biased token is chosen in 20 greedy steps."""
    body = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": 20,
        "temperature": 0,
        "logit_bias": {str(FORCED_TOKEN): 8},
        "logprobs": 0,
        "ignore_eos": True,
        **sampling,
    }
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    forced = detokenize(server, [FORCED_TOKEN])
    return response.json()["choices"][0]["logprobs"]["tokens"].count(forced)


@pytest.mark.parametrize(
    "penalty",
    [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}],
    ids=["presence", "frequency", "repetition"],
)
def test_penalties_discourage_repeating_a_token(tiny_server, penalty):
    baseline = _forced_count(tiny_server, {})
    assert baseline >= 10, "a +8 bias should make greedy repeat the token"
    assert _forced_count(tiny_server, penalty) < baseline
    # Through the SDK: standard fields as arguments, the vLLM one in extra_body.
    client = client_for(tiny_server)
    standard = {k: v for k, v in penalty.items() if k != "repetition_penalty"}
    extra = {"ignore_eos": True, **{k: v for k, v in penalty.items() if k == "repetition_penalty"}}
    response = client.completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=0, extra_body=extra, **standard)
    assert response.usage.completion_tokens == 5


def test_user_field_is_accepted(tiny_server):
    client = client_for(tiny_server)
    response = client.completions.create(model=MODEL, prompt="who am I", max_tokens=3, user="user-1234", **GREEDY)
    assert response.usage.completion_tokens == 3


# ----------------------------------------------------- stop conditions, EOS


def test_stop_string_and_list(tiny_server):
    client = client_for(tiny_server)
    prompt = "stop strings are matched on text"
    full = greedy_text(client, prompt, 16)
    assert len(full) > 12
    stop = full[8:11]
    expected = full[: full.index(stop)]

    one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=stop, **GREEDY).choices[0]
    assert one.text == expected
    assert stop not in one.text
    assert one.finish_reason == "stop"
    assert one.stop_reason == stop

    listed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=["\x00never\x00", stop], **GREEDY).choices[0]
    assert listed.text == expected and listed.finish_reason == "stop"

    # Streaming never leaks (part of) the stop string.
    texts, finish, _ = stream_choices(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=[stop], stream=True, **GREEDY)
    )
    assert texts[0] == expected and finish[0] == "stop"


def test_eos_ignore_eos_min_tokens(tiny_server):
    client = client_for(tiny_server)
    eos_bias = {str(EOS): 100}
    stopped = client.completions.create(model=MODEL, prompt="end", max_tokens=8, temperature=0, logit_bias=eos_bias)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 1
    assert stopped.choices[0].text == ""

    ignored = client.completions.create(
        model=MODEL, prompt="end", max_tokens=5, temperature=0, logit_bias=eos_bias, extra_body={"ignore_eos": True}
    )
    assert ignored.choices[0].finish_reason == "length"
    assert ignored.usage.completion_tokens == 5

    delayed = client.completions.create(
        model=MODEL, prompt="end", max_tokens=8, temperature=0, logit_bias=eos_bias, extra_body={"min_tokens": 3}
    )
    assert delayed.choices[0].finish_reason == "stop"
    assert delayed.usage.completion_tokens == 4  # 3 banned-EOS tokens, then EOS
    assert delayed.choices[0].text == greedy_text(client, "end", 3)


def test_stop_token_ids(tiny_server):
    client = client_for(tiny_server)
    bias = {str(FORCED_TOKEN): 100}
    first = client.completions.create(
        model=MODEL, prompt="x", max_tokens=8, temperature=0, logit_bias=bias, extra_body={"stop_token_ids": [FORCED_TOKEN]}
    )
    assert first.choices[0].finish_reason == "stop"
    assert first.choices[0].stop_reason == FORCED_TOKEN
    assert first.usage.completion_tokens == 1
    later = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=8,
        temperature=0,
        logit_bias=bias,
        extra_body={"stop_token_ids": [FORCED_TOKEN], "min_tokens": 3},
    )
    assert later.choices[0].finish_reason == "stop"
    assert later.choices[0].stop_reason == FORCED_TOKEN
    assert later.usage.completion_tokens == 4


def test_skip_special_tokens(tiny_server):
    client = client_for(tiny_server)
    special = 1  # <|im_start|>
    kwargs = dict(model=MODEL, prompt="specials", max_tokens=3, temperature=0, logit_bias={str(special): 100})
    skipped = client.completions.create(**kwargs)
    kept = client.completions.create(**kwargs, extra_body={"skip_special_tokens": False})
    assert skipped.usage.completion_tokens == kept.usage.completion_tokens == 3
    assert skipped.choices[0].text == ""
    assert kept.choices[0].text == detokenize(tiny_server, [special] * 3) == "<|im_start|>" * 3


# ----------------------------------------------------------------- echo


def test_echo_prepends_the_prompt(tiny_server):
    client = client_for(tiny_server)
    prompt = "Echo this prompt"
    plain = greedy_text(client, prompt, 5)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, echo=True, **GREEDY)
    assert echoed.choices[0].text == prompt + plain
    assert echoed.usage.completion_tokens == 5

    ids = tokenize(tiny_server, prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, echo=True, **GREEDY)
    assert by_ids.choices[0].text == detokenize(tiny_server, ids) + plain

    texts, _, _ = stream_choices(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, echo=True, stream=True, **GREEDY))
    assert texts[0] == prompt + plain


# ----------------------------------------------------------------- logprobs


def shown_bytes(token: str) -> bytes:
    """A legacy-logprobs token string back to its bytes (``\\xNN``: one byte)."""
    pieces = re.split(r"\\x([0-9a-f]{2})", token)
    return b"".join(bytes([int(piece, 16)]) if i % 2 else piece.encode() for i, piece in enumerate(pieces))


def _check_legacy_logprobs(logprobs, text: str, k: int, greedy: bool, skip_first: bool = False) -> None:
    n = len(logprobs.tokens)
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == n
    # text_offset counts whole characters before each token; bytes of a
    # partial character (shown as \xNN) count once the character completes.
    decoder, position, offsets = codecs.getincrementaldecoder("utf-8")("replace"), 0, []
    for token in logprobs.tokens:
        offsets.append(position)
        position += len(decoder.decode(shown_bytes(token)))
    assert logprobs.text_offset == offsets
    assert b"".join(map(shown_bytes, logprobs.tokens)).decode("utf-8", "replace").rstrip("\ufffd") == text
    for position in range(1 if skip_first else 0, n):
        token, logprob, top = logprobs.tokens[position], logprobs.token_logprobs[position], logprobs.top_logprobs[position]
        assert logprob is not None and logprob <= 0.0
        assert top is not None and 1 <= len(top) <= k + 1
        assert token in top and math.isclose(top[token], logprob, abs_tol=1e-4)
        assert all(value <= 0.0 for value in top.values())
        if greedy:
            assert math.isclose(logprob, max(top.values()), abs_tol=1e-4), f"greedy token {token!r} is not the top logprob at {position}"


def test_logprobs_legacy_shape_and_greedy_argmax(tiny_server):
    client = client_for(tiny_server)
    response = client.completions.create(model=MODEL, prompt="Logprobs please", max_tokens=6, logprobs=3, **GREEDY)
    choice = response.choices[0]
    assert len(choice.logprobs.tokens) == 6
    _check_legacy_logprobs(choice.logprobs, choice.text, 3, greedy=True)
    for top in choice.logprobs.top_logprobs:
        assert len(top) >= 2  # k=3 alternatives (distinct texts may merge, never down to one)

    zero = client.completions.create(model=MODEL, prompt="Logprobs please", max_tokens=6, logprobs=0, **GREEDY).choices[0]
    assert zero.text == choice.text
    assert zero.logprobs.tokens == choice.logprobs.tokens
    for top in zero.logprobs.top_logprobs:
        assert len(top) == 1

    # Sampled tokens still carry consistent logprobs (not necessarily the argmax).
    sampled = client.completions.create(
        model=MODEL, prompt="Logprobs please", max_tokens=6, logprobs=2, temperature=1.0, seed=5, extra_body={"ignore_eos": True}
    ).choices[0]
    _check_legacy_logprobs(sampled.logprobs, sampled.text, 2, greedy=False)


def test_logprobs_with_echo_include_the_prompt(tiny_server):
    client = client_for(tiny_server)
    prompt = "Prompt logprobs too"
    num_prompt = len(tokenize(tiny_server, prompt))
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=2, echo=True, **GREEDY)
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert response.usage.prompt_tokens == num_prompt
    assert len(logprobs.tokens) == num_prompt + 4
    assert logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    assert all(value is not None for value in logprobs.token_logprobs[1:])
    assert choice.text.startswith(prompt)
    assert "".join(logprobs.tokens[:num_prompt]) == prompt
    assert logprobs.text_offset[num_prompt] == len(prompt)
    _check_legacy_logprobs(logprobs, choice.text, 2, greedy=False, skip_first=True)
    # The generated part is greedy: its chosen tokens are the argmax.
    for position in range(num_prompt, num_prompt + 4):
        assert math.isclose(logprobs.token_logprobs[position], max(logprobs.top_logprobs[position].values()), abs_tol=1e-4)


def test_logprobs_do_not_depend_on_temperature(tiny_server):
    """docs/API.md: logprobs are taken before temperature (vLLM's processed logprobs)."""
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, prompt="temperature-free logprobs", max_tokens=5, logprobs=2)
    greedy = client.completions.create(temperature=0, extra_body={"ignore_eos": True}, **kwargs).choices[0].logprobs
    hot = client.completions.create(temperature=1.7, extra_body={"ignore_eos": True, "top_k": 1}, **kwargs).choices[0].logprobs
    assert hot.tokens == greedy.tokens
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(hot.token_logprobs, greedy.token_logprobs, strict=True))


def test_streamed_logprobs_match_non_streamed(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, prompt="stream my logprobs", max_tokens=6, logprobs=2, **GREEDY)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values = [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
    assert tokens == whole.tokens
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(values, whole.token_logprobs, strict=True))


# ----------------------------------------------------------------- streaming


def test_stream_equals_non_stream_with_usage_chunk(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(model=MODEL, prompt="Streaming and non-streaming agree", max_tokens=12, **GREEDY)
    whole = client.completions.create(**kwargs)
    texts, finish, chunks = stream_choices(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert texts == {0: whole.choices[0].text}
    assert finish == {0: "length"}
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(chunk.id == chunks[0].id and chunk.object == "text_completion" for chunk in chunks)
    # Without include_usage no chunk carries usage.
    _, _, plain = stream_choices(client.completions.create(stream=True, **kwargs))
    assert all(chunk.usage is None for chunk in plain) and all(chunk.choices for chunk in plain)


def test_n_streams_interleave_by_index(tiny_server):
    client = client_for(tiny_server)
    kwargs = dict(
        model=MODEL,
        prompt=["interleave one", "interleave two"],
        n=3,
        max_tokens=8,
        temperature=1.0,
        seed=99,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**kwargs)
    texts, finish, chunks = stream_choices(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert sorted(texts) == list(range(6))
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {i: "length" for i in range(6)}
    order = [chunk.choices[0].index for chunk in chunks if chunk.choices]
    first_finish = min(i for i, chunk in enumerate(chunks) if chunk.choices and chunk.choices[0].finish_reason)
    assert len({index for index in order[:first_finish]}) > 1, "choices should interleave, not run one after another"
    assert chunks[-1].usage.completion_tokens == 48

    greedy = client.completions.create(model=MODEL, prompt="interleave greedy", n=2, max_tokens=6, stream=True, **GREEDY)
    greedy_texts, _, _ = stream_choices(greedy)
    assert greedy_texts[0] == greedy_texts[1] == greedy_text(client, "interleave greedy", 6)


async def test_async_client_stream_and_non_stream(tiny_server):
    aclient = async_client_for(tiny_server)
    try:
        kwargs = dict(model=MODEL, prompt="async SDK", max_tokens=8, **GREEDY)
        whole = await aclient.completions.create(**kwargs)
        stream = await aclient.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert chunks[-1].usage.completion_tokens == 8
    finally:
        await aclient.close()

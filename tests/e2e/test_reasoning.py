"""Reasoning output through the official SDKs against a real ``tokenstep serve``
whose chat template thinks in ``<think>`` blocks (so ``--reasoning-parser
auto`` picks the parser): chat's ``reasoning_content`` (whole and streamed),
the Responses API's reasoning items and events, the Messages API's thinking
blocks, and the template's ``enable_thinking`` switch.

The tiny model writes random text, so the outputs that must contain a block
are shaped by a regex (``guided_regex``); where the template opens the block
itself, the unconstrained output is all reasoning."""

import json
import re
from pathlib import Path

import anthropic
import openai
import pytest

from tests.e2e.conftest import running_server

MODEL = "tiny"
# Qwen3's switch, DeepSeek-R1's opening: enable_thinking true opens the block
# in the prompt, false closes an empty one, unset leaves it to the model.
THINKING_TEMPLATE = """{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.role == 'assistant' %}{{ message.content.split('</think>')[-1] | trim }}{% else %}{{ message.content }}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% elif enable_thinking is defined and enable_thinking %}<think>
{% endif %}{%- endif %}"""
WORDS = "[a-z]{1,6}( [a-z]{1,6}){0,2}"
THOUGHT_THEN_ANSWER = f"<think>\n{WORDS}\n</think>\n\n{WORDS}"
HELLO = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0, "max_tokens": 120}


@pytest.fixture(scope="module")
def thinking_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("thinking")
    template = folder / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    args = [
        str(tiny_llama_dir),
        "--served-model-name",
        MODEL,
        "--kv-cache-memory",
        "32MiB",
        "--dtype",
        "float32",
        "--chat-template",
        str(template),
    ]
    yield from running_server(args, folder / "server.log")


def chat_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def expected_split(reasoning: str, content: str) -> None:
    """Both sides of the split are the regex's words: no tag, no whitespace around them."""
    assert re.fullmatch(WORDS, reasoning), reasoning
    assert re.fullmatch(WORDS, content), content


def test_chat_splits_the_thinking_block_from_the_answer(thinking_server):
    client = chat_client(thinking_server)
    kwargs = dict(model=MODEL, messages=HELLO, extra_body={"guided_regex": THOUGHT_THEN_ANSWER}, **GREEDY)
    message = client.chat.completions.create(**kwargs).choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    expected_split(reasoning, message.content)
    assert message.model_extra["reasoning"] == reasoning

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [choice.delta for chunk in chunks for choice in chunk.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content
    assert not any("<think>" in (d.content or "") or "</think>" in (d.content or "") for d in deltas)


def test_a_block_the_template_opens_is_reasoning_from_the_first_token(thinking_server):
    thinking_on = {"chat_template_kwargs": {"enable_thinking": True}}
    cut = (
        chat_client(thinking_server)
        .chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, extra_body=thinking_on)
        .choices[0]
    )
    assert cut.finish_reason == "length"
    assert cut.message.model_extra["reasoning_content"] and cut.message.content is None, "cut while thinking: all reasoning"


def test_thinking_switched_off_is_all_answer(thinking_server):
    message = (
        chat_client(thinking_server)
        .chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"chat_template_kwargs": {"enable_thinking": False}, "guided_regex": WORDS}, **GREEDY
        )
        .choices[0]
        .message
    )
    assert re.fullmatch(WORDS, message.content)
    assert "reasoning_content" not in message.model_extra and "reasoning" not in message.model_extra
    effort = chat_client(thinking_server).chat.completions.create(model=MODEL, messages=HELLO, reasoning_effort="low", max_tokens=2)
    assert effort.choices[0].finish_reason == "length", "reasoning_effort is taken where the model thinks"


def test_responses_give_a_reasoning_item_before_the_message(thinking_server):
    client = chat_client(thinking_server)
    kwargs = dict(
        model=MODEL,
        input="Hello there",
        max_output_tokens=120,
        temperature=0,
        reasoning={"effort": "low"},
        extra_body={"guided_regex": THOUGHT_THEN_ANSWER},
    )
    response = client.responses.create(**kwargs)
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"], kinds
    reasoning = response.output[0].content[0].text
    expected_split(reasoning, response.output_text)
    assert response.usage.output_tokens_details.reasoning_tokens > 0

    events = list(client.responses.create(stream=True, **kwargs))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert done.text == reasoning and done.output_index == 0
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output[0].content[0].text == reasoning
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**{**kwargs, "reasoning": {"effort": "low", "summary": "auto"}})
    assert caught.value.body["param"] == "reasoning.summary", "the reasoning comes back whole, never summarized"


def test_messages_give_a_thinking_block(thinking_server):
    client = anthropic.Anthropic(base_url=thinking_server.base_url, api_key="unused", max_retries=0)
    kwargs = dict(
        model=MODEL, messages=HELLO, max_tokens=8, thinking={"type": "enabled", "budget_tokens": 1024}, extra_body={"temperature": 0}
    )
    message = client.messages.create(**kwargs)
    assert [block.type for block in message.content] == ["thinking"] and message.stop_reason == "max_tokens"
    chat = chat_client(thinking_server).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": True}}
    )
    assert message.content[0].thinking == chat.choices[0].message.model_extra["reasoning_content"]

    with client.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.content[0].thinking == message.content[0].thinking
    assert {e.delta.type for e in events if e.type == "content_block_delta"} == {"thinking_delta"}


def test_the_start_log_says_the_parser_applies(thinking_server):
    assert "reasoning: <think>...</think> blocks are split from answers (--reasoning-parser auto)" in thinking_server.log_path.read_text()


THINKING_ON = {"chat_template_kwargs": {"enable_thinking": True}}


def test_a_thinking_budget_closes_the_block_and_the_answer_follows(thinking_server):
    client = chat_client(thinking_server)
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=24, temperature=0)
    unbounded = client.chat.completions.create(**kwargs, extra_body={**THINKING_ON, "ignore_eos": True}).choices[0].message
    assert unbounded.content is None, "the random model never closes the block itself"
    budget = client.chat.completions.create(**kwargs, extra_body={**THINKING_ON, "ignore_eos": True, "max_reasoning_tokens": 4})
    message = budget.choices[0].message
    assert message.model_extra["reasoning_content"] and message.content, message
    assert unbounded.model_extra["reasoning_content"].startswith(message.model_extra["reasoning_content"][:3])
    assert budget.usage.completion_tokens == 24


def test_structured_output_applies_to_the_answer_after_the_block(thinking_server):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    message = (
        chat_client(thinking_server)
        .chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=80,
            temperature=0,
            response_format=response_format,
            extra_body={**THINKING_ON, "max_reasoning_tokens": 3},
        )
        .choices[0]
        .message
    )
    assert message.model_extra["reasoning_content"], "it thought first"
    assert set(json.loads(message.content)) == {"city"}


def test_anthropic_budget_tokens_close_the_thinking_block(thinking_server):
    client = anthropic.Anthropic(base_url=thinking_server.base_url, api_key="unused", max_retries=0)
    message = client.messages.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=20,
        thinking={"type": "enabled", "budget_tokens": 3},
        extra_body={"temperature": 0, "ignore_eos": True},
    )
    assert [block.type for block in message.content] == ["thinking", "text"], message.content


def test_a_budget_for_a_model_that_does_not_think_is_refused(tiny_server):
    with pytest.raises(openai.BadRequestError) as caught:
        chat_client(tiny_server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, extra_body={"max_reasoning_tokens": 8})
    assert caught.value.body["param"] == "max_reasoning_tokens"

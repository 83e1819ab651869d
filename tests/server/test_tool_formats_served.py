"""Each tool-call format end to end over the real engine (the tiny random
Llama, in-process) through the OpenAI SDK: a chat template showing the
family's marks makes the server read and force calls in that family's
syntax, and a forced call comes back as the same OpenAI ``tool_calls``,
whole and streamed. Where a family's tag is a special token of the
vocabulary, the forced call writes that one token and the parser still sees
it (special tokens kept in the text).

Then each family's own template (``tests/chat_templates``, written from the
family's documentation) on a vocabulary holding the family's tags: the
whole round trip, a forced call, its result sent back, and the next turn
rendered as the family writes calls and results (read back from
``/tokenize``, the chat route's own rendering)."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from batching.batcher import DynamicBatcher
from server.app import create_app
from server.cli import parse_settings
from server.engine_builder import build_engine_core
from server.settings import Settings
from server.state import Served
from tests.server.conftest import BASE_URL, MODEL_NAME, running, tiny_engine_config
from tests.tiny_models import build_tiny_llama_with_special_tokens

pytestmark = pytest.mark.asyncio(loop_scope="session")

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if tools %}{# MARKS #}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKS = {
    "hermes": "<tool_call>",
    "llama3_json": "<|python_tag|>",
    "mistral": "[TOOL_CALLS]",
    "mistral-names-apart": "[TOOL_CALLS] [ARGS]",
    "qwen3_coder": "<function= <parameter=",
    "deepseek": "<｜tool▁calls▁begin｜>",
    "harmony": "<|channel|> <|message|>",
}


FORCED = dict(
    messages=[{"role": "user", "content": "Weather in Paris?"}],
    tools=TOOLS,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=200,
    temperature=1.0,
    seed=3,
)


async def forced_call_both_ways(served: Served, family: str) -> openai.types.chat.ChatCompletion:
    """A forced call through the OpenAI SDK, whole and streamed: the same valid call both ways."""
    async with running(create_app(Settings(api_key=None), ready=served)) as http:
        client = openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", http_client=http, max_retries=0)
        completion = await client.chat.completions.create(model=MODEL_NAME, logprobs=True, **FORCED)
        whole = completion.choices[0]
        assert whole.finish_reason == "tool_calls", whole
        (call,) = whole.message.tool_calls
        assert call.function.name == "get_weather" and whole.message.content is None
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
        if family.startswith("mistral"):
            assert len(call.id) == 9 and call.id.isalnum()
        chunks = [chunk async for chunk in await client.chat.completions.create(model=MODEL_NAME, stream=True, **FORCED)]
        fragments = [f.function for chunk in chunks for choice in chunk.choices for f in choice.delta.tool_calls or []]
        assert [(f.name, f.arguments) for f in fragments] == [(call.function.name, call.function.arguments)], "the same call, sent whole"
        assert not any(choice.delta.content for chunk in chunks for choice in chunk.choices)
        return completion


@pytest.mark.parametrize("family", list(MARKS))
async def test_a_forced_call_in_each_familys_format(make_served: Callable[[], Served], family: str):
    base = make_served()
    template = CHATML.replace("MARKS", MARKS[family])
    served = Served(base.batcher, base.tokenizer, MODEL_NAME, base.max_model_len, chat_template=template)
    assert served.tool_format.name == family.removesuffix("-names-apart")
    await forced_call_both_ways(served, family)


@pytest.fixture(scope="module")
def mistral_vocab_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir):
    return build_tiny_llama_with_special_tokens(tmp_path_factory.mktemp("mistral-vocab"), default_model_dir, ["[TOOL_CALLS]", "[ARGS]"])


async def test_a_tag_that_is_a_special_token_is_forced_as_that_token_and_read_back(mistral_vocab_dir):
    core = build_engine_core(tiny_engine_config(mistral_vocab_dir))
    template = CHATML.replace("MARKS", MARKS["mistral-names-apart"])
    served = Served(DynamicBatcher(core), core.tokenizer, MODEL_NAME, core.max_model_len, chat_template=template)
    assert served.tool_format.name == "mistral" and served.tool_format.needs_special_tokens
    completion = await forced_call_both_ways(served, "mistral")
    tokens = [entry.token for entry in completion.choices[0].logprobs.content]
    assert tokens[0] == "[TOOL_CALLS]" and "[ARGS]" in tokens, "each tag is its one special token"


async def test_harmony_channels_become_reasoning_and_content(make_served: Callable[[], Served]):
    base = make_served()
    template = CHATML.replace("MARKS", MARKS["harmony"])
    served = Served(base.batcher, base.tokenizer, MODEL_NAME, base.max_model_len, chat_template=template)
    shape = r"<\|channel\|>analysis<\|message\|>[a-z]{1,6}<\|end\|><\|start\|>assistant<\|channel\|>final<\|message\|>[a-z]{1,6}"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 80, "temperature": 0, "guided_regex": shape}
    async with running(create_app(Settings(api_key=None), ready=served)) as client:
        message = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
        assert message["reasoning_content"].isalpha() and message["content"].isalpha(), message
        assert message["reasoning"] == message["reasoning_content"]
        effort = await client.post("/v1/chat/completions", json={**body, "reasoning_effort": "low"})
        assert effort.status_code == 200, "gpt-oss templates take reasoning_effort"


TEMPLATES = Path(__file__).parent.parent / "chat_templates"
RESULT = '{"temperature": 21}'


def _qwen3_coder_call(arguments: dict[str, Any], call_id: str) -> str:
    parameters = "".join(
        f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value)}\n</parameter>\n" for key, value in arguments.items()
    )
    return f"<tool_call>\n<function=get_weather>\n{parameters}</function>\n</tool_call>"


def _arguments(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)


@dataclass(frozen=True)
class Family:
    """One family's template and vocabulary, and how its next prompt shows a call and a result."""

    template: str
    format_name: str
    special: tuple[str, ...]
    call: Callable[[dict[str, Any], str], str]  # (arguments, call id) -> the call in the next prompt
    result: Callable[[str], str]  # call id -> the tool's result in the next prompt
    opens_with: str | None  # a forced call's first token (None: a JSON token)
    plain: tuple[str, ...] = ()
    bos: str | None = None
    eos: tuple[str, ...] = ()


MISTRAL_TAGS = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
DEEPSEEK_TAGS = tuple(
    f"<｜{tag}｜>" for tag in ("User", "Assistant", "tool▁calls▁begin", "tool▁calls▁end", "tool▁call▁begin", "tool▁call▁end", "tool▁sep")
) + ("<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>")
FAMILIES = {
    "llama3_1": Family(
        "llama3_1.jinja",
        "llama3_json",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        lambda a, _: f'<|start_header_id|>assistant<|end_header_id|>\n\n{{"name": "get_weather", "parameters": {_arguments(a)}}}<|eot_id|>',
        lambda _: f"<|start_header_id|>ipython<|end_header_id|>\n\n{RESULT}<|eot_id|>",
        None,
        bos="<|begin_of_text|>",
        eos=("<|eot_id|>", "<|eom_id|>"),
    ),
    "mistral_v3": Family(
        "mistral_v3.jinja",
        "mistral",
        MISTRAL_TAGS,
        lambda a, i: f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {_arguments(a)}, "id": "{i}"}}]</s>',
        lambda i: f'[TOOL_RESULTS]{{"content": {RESULT}, "call_id": "{i}"}}[/TOOL_RESULTS]',
        "[TOOL_CALLS]",
        bos="<s>",
        eos=("</s>",),
    ),
    "mistral_v11": Family(
        "mistral_v11.jinja",
        "mistral",
        (*MISTRAL_TAGS, "[ARGS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
        lambda a, _: f"[TOOL_CALLS]get_weather[ARGS]{_arguments(a)}</s>",
        lambda _: f"[TOOL_RESULTS]{RESULT}[/TOOL_RESULTS]",
        "[TOOL_CALLS]",
        bos="<s>",
        eos=("</s>",),
    ),
    "qwen3_coder": Family(
        "qwen3_coder.jinja",
        "qwen3_coder",
        (),
        _qwen3_coder_call,
        lambda _: f"<tool_response>\n{RESULT}\n</tool_response>",
        "<tool_call>",
        plain=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
        eos=("<|im_end|>",),
    ),
    "deepseek_v3_1": Family(
        "deepseek_v3_1.jinja",
        "deepseek",
        DEEPSEEK_TAGS,
        lambda a, _: (
            f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{_arguments(a)}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
        ),
        lambda _: f"<｜tool▁output▁begin｜>{RESULT}<｜tool▁output▁end｜>",
        "<｜tool▁calls▁begin｜>",
        plain=("<think>", "</think>"),
        bos="<｜begin▁of▁sentence｜>",
        eos=("<｜end▁of▁sentence｜>",),
    ),
    "gpt_oss": Family(
        "gpt_oss.jinja",
        "harmony",
        ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"),
        lambda a, _: (
            f"<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{_arguments(a)}<|call|>"
        ),
        lambda _: f"<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{RESULT}<|end|>",
        "<|channel|>",
        eos=("<|return|>", "<|call|>"),
    ),
}


def serve_family(name: str, tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> tuple[Family, Served]:
    """The tiny Llama with the family's vocabulary and template, served in-process."""
    family = FAMILIES[name]
    model_dir = build_tiny_llama_with_special_tokens(
        tmp_path_factory.mktemp(name),
        default_model_dir,
        list(family.special),
        plain_tokens=family.plain,
        bos=family.bos,
        eos=family.eos,
        chat_template=(TEMPLATES / family.template).read_text(),
    )
    core = build_engine_core(tiny_engine_config(model_dir))
    return family, Served(DynamicBatcher(core), core.tokenizer, MODEL_NAME, core.max_model_len)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_served(request, tmp_path_factory: pytest.TempPathFactory, default_model_dir) -> tuple[Family, Served]:
    return serve_family(request.param, tmp_path_factory, default_model_dir)


def _contains(tokens: list[int], part: list[int]) -> bool:
    return any(tokens[start : start + len(part)] == part for start in range(len(tokens) - len(part) + 1))


async def test_each_familys_template_round_trips_a_call_and_its_result(family_served: tuple[Family, Served]):
    """Forced call -> the client sends it back with the tool's result -> the
    next prompt shows both as the family writes them, its tags as their one
    tokens, and the next turn runs on exactly that prompt."""
    family, served = family_served
    assert served.tool_format.name == family.format_name, "picked from the family's own template"
    completion = await forced_call_both_ways(served, family.format_name)
    if family.opens_with:
        assert completion.choices[0].logprobs.content[0].token == family.opens_with
    message = completion.choices[0].message
    (call,) = message.tool_calls
    history = [
        *FORCED["messages"],
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]
    tokenizer = served.tokenizer
    async with running(create_app(Settings(api_key=None), ready=served)) as http:
        rendered = await http.post("/tokenize", json={"model": MODEL_NAME, "messages": history, "tools": TOOLS})
        assert rendered.status_code == 200, rendered.text
        tokens = rendered.json()["tokens"]
        for shown in (family.call(json.loads(call.function.arguments), call.id), family.result(call.id)):
            assert _contains(tokens, tokenizer(shown, add_special_tokens=False).input_ids), (shown, tokenizer.decode(tokens))
        tags = [tag for tag in (*family.special, *family.plain) if tag in tokenizer.decode(tokens)]
        assert tags and all(tokenizer.convert_tokens_to_ids(tag) in tokens for tag in tags), "each tag is its one token"
        client = openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", http_client=http, max_retries=0)
        next_turn = await client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=4, temperature=0)
        assert next_turn.usage.prompt_tokens == rendered.json()["count"]
        assert next_turn.choices[0].finish_reason in ("stop", "length", "tool_calls")


async def test_deepseek_thinks_then_calls_when_its_template_opens_the_block(tmp_path_factory, default_model_dir):
    """DeepSeek-V3.1 with ``thinking``: the prompt ends inside <think>, so the
    output starts as reasoning; the budget closes the block and the forced
    call follows it in DeepSeek's tags."""
    _, served = serve_family("deepseek_v3_1", tmp_path_factory, default_model_dir)
    assert served.reasoning is not None
    async with running(create_app(Settings(api_key=None), ready=served)) as http:
        client = openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", http_client=http, max_retries=0)
        thinking = {"chat_template_kwargs": {"thinking": True}, "max_reasoning_tokens": 3}
        completion = await client.chat.completions.create(model=MODEL_NAME, extra_body=thinking, **FORCED)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content, choice
    (call,) = choice.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)


async def test_thinking_tags_that_are_special_tokens_still_split_reasoning(tmp_path_factory, default_model_dir):
    """Where ``<think>`` and ``</think>`` are special tokens of the vocabulary
    (as some conversions mark them), the output keeps them, so the reasoning
    is still split from the answer rather than merged into it."""
    opens_block = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    model_dir = build_tiny_llama_with_special_tokens(
        tmp_path_factory.mktemp("special-think"), default_model_dir, ["<think>", "</think>"], chat_template=opens_block
    )
    core = build_engine_core(tiny_engine_config(model_dir))
    served = Served(DynamicBatcher(core), core.tokenizer, MODEL_NAME, core.max_model_len)
    assert served.keeps_special_tokens
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0, "max_reasoning_tokens": 3}
    async with running(create_app(Settings(api_key=None), ready=served)) as client:
        message = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"], message
    assert "think>" not in message["reasoning_content"] + message["content"], "the tags split, they are not text"


@pytest.mark.parametrize(
    ("flags", "marks", "tool_format", "thinks"),
    [
        (["--tool-call-parser", "mistral"], "<tool_call> </think>", "mistral", True),
        (["--tool-call-parser", "hermes", "--reasoning-parser", "none"], "[TOOL_CALLS] </think>", "hermes", False),
        (["--reasoning-parser", "deepseek_r1"], "<tool_call>", "hermes", True),
    ],
)
async def test_parser_flags_override_what_the_template_shows(make_served, flags, marks, tool_format, thinks):
    settings = parse_settings(flags)
    base = make_served()
    served = Served(
        base.batcher,
        base.tokenizer,
        MODEL_NAME,
        base.max_model_len,
        chat_template=CHATML.replace("MARKS", marks),
        reasoning_parser=settings.reasoning_parser,
        tool_call_parser=settings.tool_call_parser,
    )
    assert served.tool_format.name == tool_format and (served.reasoning is not None) == thinks
    if tool_format == "mistral":
        completion = await forced_call_both_ways(served, tool_format)
        assert completion.choices[0].logprobs.content[0].token.startswith("[")

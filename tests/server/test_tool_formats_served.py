"""Each tool-call format end to end over the real engine (the tiny random
Llama, in-process) through the OpenAI SDK: a chat template showing the
family's marks makes the server read and force calls in that family's
syntax, and a forced call comes back as the same OpenAI ``tool_calls``,
whole and streamed. Where a family's tag is a special token of the
vocabulary, the forced call writes that one token and the parser still sees
it (special tokens kept in the text)."""

import json
from collections.abc import Callable

import jsonschema
import openai
import pytest

from batching.batcher import DynamicBatcher
from server.app import create_app
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

"""Each tool-call format end to end over the real engine (the tiny random
Llama, in-process): a chat template showing the family's marks makes the
server read and force calls in that family's syntax, and a forced call comes
back as the same OpenAI ``tool_calls``, whole and streamed."""

import json
from collections.abc import Callable

import jsonschema
import pytest

from server.app import create_app
from server.settings import Settings
from server.state import Served
from tests.server.conftest import MODEL_NAME, running
from tests.server.sse import sse_data

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


@pytest.mark.parametrize("family", list(MARKS))
async def test_a_forced_call_in_each_familys_format(make_served: Callable[[], Served], family: str):
    base = make_served()
    template = CHATML.replace("MARKS", MARKS[family])
    served = Served(base.batcher, base.tokenizer, MODEL_NAME, base.max_model_len, chat_template=template)
    assert served.tool_format.name == family.removesuffix("-names-apart")
    body = {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 200,
        "temperature": 1.0,
        "seed": 3,
    }
    async with running(create_app(Settings(api_key=None), ready=served)) as client:
        whole = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
        assert whole["finish_reason"] == "tool_calls", whole
        (call,) = whole["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and whole["message"]["content"] is None
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_PARAMETERS)
        if family.startswith("mistral"):
            assert len(call["id"]) == 9 and call["id"].isalnum()

        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = [json.loads(data) for data in sse_data(streamed.text) if data != "[DONE]"]
        fragments = [f for chunk in chunks for choice in chunk["choices"] for f in choice["delta"].get("tool_calls") or []]
        assert [f["function"] for f in fragments] == [call["function"]], "the same call, sent whole"
        assert not any(choice["delta"].get("content") for chunk in chunks for choice in chunk["choices"])


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

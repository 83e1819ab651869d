"""``tokenstep serve --quantization int8`` on the embedded default model,
through the OpenAI SDK: the real model still answers, streamed and not."""

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import ServerProcess, running_server

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def int8_server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "int8_server.log"
    env = {"TOKENSTEP_CACHE_DIR": str(default_model_dir.parent), "TOKENSTEP_KV_CACHE_MEMORY": "128MiB"}
    yield from running_server(["--quantization", "int8"], log, env)


def test_int8_default_model_answers_streamed_and_not(int8_server: ServerProcess):
    client = openai.OpenAI(base_url=f"{int8_server.base_url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0).choices[0].message.content
    assert "Paris" in answer
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True) if chunk.choices)
    assert streamed == answer
    assert "211 linears int8" in int8_server.log_path.read_text()

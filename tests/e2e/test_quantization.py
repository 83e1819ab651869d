"""``tokenstep serve --quantization int8``, ``--quantization gguf`` with
float32 activations and ``--quantization none`` (float32, the exact mode) on
the embedded default model, through the OpenAI SDK: the real model still
answers, streamed and not. The default (gguf, int16 activations) is
``default_server``'s, checked in test_api_misc.py."""

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import ServerProcess, running_server

MODEL = "smollm2-135m-instruct"
# Flags, and what the log says was served with them.
LAYOUTS = {
    "int8": (["--quantization", "int8"], "MiB held; activations float32;"),  # weight-only: auto keeps float inputs
    "gguf-float32": (["--quantization", "gguf", "--activations", "float32"], "activations float32;"),
    "none": (["--quantization", "none"], "serving: weights float32,"),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def quantized_server(
    request: pytest.FixtureRequest, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerProcess]]:
    log = tmp_path_factory.mktemp("logs") / f"{request.param}_server.log"
    env = {"TOKENSTEP_CACHE_DIR": str(default_model_dir.parent), "TOKENSTEP_KV_CACHE_MEMORY": "128MiB"}
    for server in running_server(LAYOUTS[request.param][0], log, env):
        yield request.param, server


def test_quantized_default_model_answers_streamed_and_not(quantized_server: tuple[str, ServerProcess]):
    quantization, server = quantized_server
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0).choices[0].message.content
    assert "Paris" in answer
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True)
        if chunk.choices
    )
    assert streamed == answer
    assert LAYOUTS[quantization][1] in server.log_path.read_text()

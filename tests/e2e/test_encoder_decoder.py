"""Encoder-decoder models served for real (uvicorn, the OpenAI SDK): the
prompt goes to the encoder and the decoder's text comes back; fields that do
not apply are 400s; a model tokenstep cannot serve ends ``tokenstep serve``
with a non-zero exit and one clear line."""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from tests.e2e.conftest import ServerProcess, running_server

PROMPT = "Translate to French: the cat sits on the mat."


@pytest.fixture(scope="module")
def t5_server(tiny_t5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "t5_server.log"
    yield from running_server(
        [str(tiny_t5_dir), "--served-model-name", "t5", "--kv-cache-memory", "64MiB", "--dtype", "float32", "--max-model-len", "512"], log
    )


@pytest.fixture(scope="module")
def client(t5_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{t5_server.base_url}/v1", api_key="unused", max_retries=0)


def greedy_text(model_dir: Path, prompt: str, max_tokens: int) -> tuple[str, int]:
    """``model.generate``'s greedy text for ``prompt`` (EOS ignored), and the source's token count."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    source = tokenizer(prompt).input_ids
    with torch.inference_mode():
        generated = model.generate(torch.tensor([source]), do_sample=False, max_new_tokens=max_tokens, eos_token_id=None)
    return tokenizer.decode(generated[0, 1:], skip_special_tokens=True), len(source)


def test_completion_is_the_decoders_text(client: OpenAI, tiny_t5_dir: Path):
    expected, num_source_tokens = greedy_text(tiny_t5_dir, PROMPT, 12)
    completion = client.completions.create(model="t5", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert completion.choices[0].text == expected
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == num_source_tokens
    assert completion.usage.completion_tokens == 12

    stream = client.completions.create(
        model="t5", prompt=PROMPT, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected


def test_sampling_options_work(client: OpenAI):
    completion = client.completions.create(
        model="t5",
        prompt=[PROMPT, "Summarize: a b c"],
        max_tokens=6,
        temperature=0.9,
        seed=7,
        n=2,
        logprobs=2,
        stop=["zzz"],
        extra_body={"ignore_eos": True},
    )
    assert len(completion.choices) == 4
    assert all(len(choice.logprobs.tokens) == 6 for choice in completion.choices)
    again = client.completions.create(
        model="t5", prompt=[PROMPT, "Summarize: a b c"], max_tokens=6, temperature=0.9, seed=7, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in again.choices] == [c.text for c in completion.choices]


def test_structured_output_and_penalties(client: OpenAI):
    choice = client.completions.create(model="t5", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"guided_choice": ["oui", "non"]})
    assert choice.choices[0].text in ("oui", "non")
    penalized = client.completions.create(
        model="t5", prompt=PROMPT, max_tokens=8, temperature=0, frequency_penalty=1.5, extra_body={"ignore_eos": True}
    )
    assert penalized.usage.completion_tokens == 8


def test_disconnects_mid_stream_leak_no_self_or_cross_blocks(t5_server: ServerProcess):
    """Clients that leave mid-answer: their requests end and both block tables go back to the pool."""
    body = {"model": "t5", "prompt": PROMPT * 20, "max_tokens": 400, "stream": True, "ignore_eos": True}
    for _ in range(4):
        with httpx.stream("POST", f"{t5_server.base_url}/v1/completions", json=body, timeout=30) as response:
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 3:
                    break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = httpx.get(f"{t5_server.base_url}/stats").json()
        if stats["running"] == 0 and "u" not in stats["kv"]["map"]:
            break
        time.sleep(0.1)
    assert stats["running"] == 0 and "u" not in stats["kv"]["map"], stats["requests"]


def test_chat_uses_the_template(client: OpenAI, tiny_t5_dir: Path):
    """The rendered chat is the source, tokenized with the tokenizer's special tokens as the encoder expects."""
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="t5", messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 5
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    source = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)).input_ids
    assert chat.usage.prompt_tokens == len(source)


def test_fields_that_do_not_apply_are_refused(client: OpenAI, t5_server: ServerProcess):
    with pytest.raises(BadRequestError, match="echo"):
        client.completions.create(model="t5", prompt=PROMPT, max_tokens=4, echo=True)
    with pytest.raises(BadRequestError, match="decoder_input_ids"):
        client.completions.create(model="t5", prompt=PROMPT, max_tokens=4, extra_body={"decoder_input_ids": [0, 5]})
    with pytest.raises(BadRequestError, match="encoder reads at most 512"):
        client.completions.create(model="t5", prompt=[5] * 600, max_tokens=4)
    with pytest.raises(BadRequestError, match="decoder writes at most"):
        client.completions.create(model="t5", prompt=PROMPT, max_tokens=600)
    tokens = httpx.post(f"{t5_server.base_url}/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(AutoTokenizer.from_pretrained(t5_server.args[0])(PROMPT).input_ids)
    metrics = httpx.get(f"{t5_server.base_url}/metrics").text
    assert "tokenstep_kv_cache_usage_ratio" in metrics


def test_chat_without_a_template_is_a_clear_400(tiny_bart_no_template_dir: Path, tmp_path: Path):
    for server in running_server(
        [str(tiny_bart_no_template_dir), "--served-model-name", "bart", "--kv-cache-memory", "32MiB"], tmp_path / "bart.log"
    ):
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(BadRequestError, match="no chat template"):
            client.chat.completions.create(model="bart", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        completion = client.completions.create(model="bart", prompt=PROMPT, max_tokens=4, temperature=0)
        assert completion.choices[0].finish_reason in ("length", "stop")


def test_a_model_tokenstep_cannot_serve_ends_the_process(tmp_path: Path):
    """A failed load exits non-zero with one clear line (not /health 503 forever)."""
    from transformers import ProphetNetConfig

    model_dir = tmp_path / "prophetnet"
    ProphetNetConfig(
        vocab_size=64,
        hidden_size=16,
        num_encoder_attention_heads=2,
        num_decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
    ).save_pretrained(model_dir)
    command = [sys.executable, "-c", "from server.cli import main; main()", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("tokenstep: could not load the model:") and "does not serve" in last_line

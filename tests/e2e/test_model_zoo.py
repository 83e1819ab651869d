"""Architectures beyond Llama through real ``tokenstep serve`` processes:
a model with alternating sliding and full layers and attention sinks
(gpt-oss's shape) answers concurrent greedy completions, prompts well past
its window, with ``generate``'s text; a model tokenstep cannot serve
exactly (Llama 4's chunked attention) ends the process at start with one
line naming the feature."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI
from transformers import AutoTokenizer

from tests.e2e.conftest import running_server
from tests.model_runtime.test_model_zoo import max_tokens_of, zoo_prompts
from tests.model_runtime.test_parity import reference_outputs


def test_a_sliding_window_model_with_sinks_answers_concurrently_as_generate_does(zoo_dir, tmp_path: Path):
    model_dir = zoo_dir("gpt-oss")
    prompts = zoo_prompts(seed=21) + zoo_prompts(seed=22)
    expected = reference_outputs(model_dir, prompts, max_tokens_of)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = [
        str(model_dir),
        "--served-model-name",
        "oss",
        "--dtype",
        "float32",
        "--max-num-batched-tokens",
        "64",
        "--kv-cache-memory",
        "256KiB",
    ]
    for server in running_server(args, tmp_path / "oss.log"):
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

        def complete(index: int, client: OpenAI = client) -> str:
            params = dict(
                model="oss",
                prompt=prompts[index],
                max_tokens=max_tokens_of(index),
                temperature=0,
                extra_body={"ignore_eos": True, "skip_special_tokens": False},
            )
            return client.completions.create(**params).choices[0].text

        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(complete, range(len(prompts))))
        assert texts == [tokenizer.decode(tokens, skip_special_tokens=False) for tokens in expected]
        metrics = httpx.get(f"{server.base_url}/metrics").text
        preemptions = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tokenstep_num_preemptions_total"))
        assert preemptions > 0, "the 256 KiB pool should not hold all sixteen requests at once"


def test_a_model_it_cannot_serve_exactly_ends_the_process_naming_why(zoo_dir):
    command = [
        sys.executable,
        "-c",
        "from server.cli import main; main()",
        "serve",
        str(zoo_dir("llama4")),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("tokenstep: could not load the model: tokenstep cannot serve this 'llama4_text' model exactly:")
    assert "chunked attention" in last_line

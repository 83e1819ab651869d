"""``--num-speculative-tokens`` (n-gram lookup) and ``--speculative-model``
(a draft model): speculative decoding through a real server gives exactly
the greedy text of a server without it, streamed in deltas of several
tokens, and reports its drafts in /metrics."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import ServerProcess, running_server
from tests.e2e.test_api_misc import metric, scrape

PHRASE = "the quick brown fox jumps over the lazy dog and "
PROMPTS = [PHRASE * 6, "Copy this list: alpha, beta, gamma, delta. Again: alpha, beta, gamma, delta. Again:", "x"]


@pytest.fixture(scope="module", params=["ngram", "draft-model"])
def speculative_server(
    request: pytest.FixtureRequest, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """n-gram lookup, or ``--speculative-model`` with a noisy copy of the served model."""
    log = tmp_path_factory.mktemp("logs") / f"speculative_server_{request.param}.log"
    args = [
        str(tiny_llama_dir),
        "--served-model-name",
        "tiny",
        "--kv-cache-memory",
        "64MiB",
        "--dtype",
        "float32",
        "--num-speculative-tokens",
        "4",
    ]
    if request.param == "draft-model":
        args += ["--speculative-model", str(request.getfixturevalue("noisy_llama_dir"))]
    yield from running_server(args, log)


def complete(server: ServerProcess, prompt: str, stream: bool = False) -> tuple[str, int]:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=64, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        return client.completions.create(**kwargs).choices[0].text, 0
    chunks = [chunk for chunk in client.completions.create(stream=True, **kwargs) if chunk.choices and chunk.choices[0].text]
    return "".join(chunk.choices[0].text for chunk in chunks), len(chunks)


def test_speculation_keeps_greedy_text_and_reports_drafts(speculative_server, tiny_server):
    drafts_before = metric(scrape(speculative_server), "tokenstep_spec_decode_num_draft_tokens_total")
    for prompt in PROMPTS:
        plain, _ = complete(tiny_server, prompt)
        assert complete(speculative_server, prompt)[0] == plain
        streamed, _ = complete(speculative_server, prompt, stream=True)
        assert streamed == plain
    text = scrape(speculative_server)
    drafts = metric(text, "tokenstep_spec_decode_num_draft_tokens_total") - drafts_before
    accepted = metric(text, "tokenstep_spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and 0 <= accepted <= metric(text, "tokenstep_spec_decode_num_draft_tokens_total")
    if "--speculative-model" in speculative_server.args:
        assert accepted > 0, "the noisy copy agrees with the served model on some tokens"


def test_sampled_and_logprob_requests_still_work_beside_speculation(speculative_server):
    response = httpx.post(
        f"{speculative_server.base_url}/v1/completions",
        json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0.8, "seed": 1, "logprobs": 2},
    )
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == response.json()["usage"]["completion_tokens"]

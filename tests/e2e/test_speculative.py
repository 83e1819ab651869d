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


MAX_TOKENS = 64


def complete(server: ServerProcess, prompt: str, stream: bool = False) -> tuple[str, int]:
    """The greedy text of ``MAX_TOKENS`` tokens, and (streamed) how many deltas carried it."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        return client.completions.create(**kwargs).choices[0].text, 0
    chunks = [chunk for chunk in client.completions.create(stream=True, **kwargs) if chunk.choices and chunk.choices[0].text]
    return "".join(chunk.choices[0].text for chunk in chunks), len(chunks)


def draft_counters(server: ServerProcess) -> tuple[float, float]:
    """(draft tokens proposed, draft tokens accepted) so far."""
    text = scrape(server)
    return metric(text, "tokenstep_spec_decode_num_draft_tokens_total"), metric(text, "tokenstep_spec_decode_num_accepted_tokens_total")


def test_speculation_keeps_greedy_text_and_reports_drafts(speculative_server, tiny_server):
    drafts_before, accepted_before = draft_counters(speculative_server)
    num_deltas = 0
    for prompt in PROMPTS:
        plain, _ = complete(tiny_server, prompt)
        assert complete(speculative_server, prompt)[0] == plain
        streamed, num_streamed_deltas = complete(speculative_server, prompt, stream=True)
        assert streamed == plain
        num_deltas += num_streamed_deltas
    drafts_after, accepted_after = draft_counters(speculative_server)
    drafts, accepted = drafts_after - drafts_before, accepted_after - accepted_before
    assert 0 < accepted <= drafts, (accepted, drafts)
    # A step that accepts drafts adds several tokens at once, and one step sends at most one delta.
    assert num_deltas < MAX_TOKENS * len(PROMPTS), "no delta carried several tokens"


def test_sampled_and_logprob_requests_still_work_beside_speculation(speculative_server):
    response = httpx.post(
        f"{speculative_server.base_url}/v1/completions",
        json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0.8, "seed": 1, "logprobs": 2},
    )
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == response.json()["usage"]["completion_tokens"]

"""The README's examples run against a real server, so they cannot rot.

Every ``curl localhost:8000`` command in the README's fenced bash blocks runs
(with ``curl``, through bash, exactly as written but for the address) against
the tiny model's server; the Python OpenAI SDK snippet runs against the tiny
server (model renamed) and, unchanged but for the address, against the real
default model it names. The embedding examples (``/v1/embeddings``,
``embeddings.create``, and ``/v1/rerank`` and ``/v1/score`` by cosine) run,
unchanged but for the address, against the real all-MiniLM-L6-v2 served as
they name it.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_api_misc import metric, wait_until_idle

README = Path(__file__).resolve().parents[2] / "README.md"
README_ADDRESS = "localhost:8000"
DEFAULT_MODEL = "smollm2-135m-instruct"


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}[ \t]*\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)


EMBEDDING_MARKS = ("/v1/embeddings", "embeddings.create", "/v1/rerank", "/v1/score")


def is_embedding_example(text: str) -> bool:
    return any(mark in text for mark in EMBEDDING_MARKS)


def curl_commands() -> list[str]:
    """Each ``curl`` command (continuation lines joined) of the bash blocks that call the server."""
    commands = []
    for block in fenced_blocks("bash"):
        if "curl" not in block or README_ADDRESS not in block:
            continue
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = line.strip()
            if line.startswith("curl ") and README_ADDRESS in line:
                commands.append(line)
    return commands


def python_snippets() -> list[str]:
    return [block for block in fenced_blocks("python") if ("OpenAI(" in block or "Anthropic(" in block) and README_ADDRESS in block]


CURL_COMMANDS = [command for command in curl_commands() if not is_embedding_example(command)]
PYTHON_SNIPPETS = [snippet for snippet in python_snippets() if not is_embedding_example(snippet)]
EMBEDDING_EXAMPLES = [example for example in curl_commands() + python_snippets() if is_embedding_example(example)]


def test_readme_has_runnable_examples():
    assert len(CURL_COMMANDS) >= 2, "the README's curl examples disappeared (or this parser no longer finds them)"
    assert any('"stream": true' in command for command in CURL_COMMANDS), "the README should show a streaming curl"
    assert PYTHON_SNIPPETS, "the README's OpenAI SDK example disappeared"
    assert len(EMBEDDING_EXAMPLES) >= 4, "the README's embedding, rerank and score examples disappeared"


@pytest.mark.parametrize("example", EMBEDDING_EXAMPLES, ids=[f"embedding{i}" for i in range(len(EMBEDDING_EXAMPLES))])
def test_readme_embedding_example(embedding_server, example):
    if example.startswith("curl "):
        command = example.replace(README_ADDRESS, embedding_server.base_url.removeprefix("http://"))
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stderr}"
        data = json.loads(result.stdout)
        assert "error" not in data and (data.get("data") or data.get("results")), data
        if "/v1/embeddings" in command:
            assert len(data["data"][0]["embedding"]) == 384, data
    else:
        assert run_snippet(example, embedding_server, model=None).strip(), "the snippet printed nothing"


def check_body(body: str) -> None:
    """A successful answer: JSON that is not an error (a completion has choices),
    an SSE stream of chunks ending in [DONE], or the Prometheus exposition."""
    body = body.strip()
    assert body, "empty response"
    if body.startswith("data:"):
        events = [event for event in body.split("\n\n") if event.strip()]
        assert all(event.startswith("data: ") for event in events), body
        payloads = [event[len("data: ") :] for event in events]
        assert payloads[-1] == "[DONE]", body
        chunks = [json.loads(payload) for payload in payloads[:-1]]
        assert chunks, "no chunks before [DONE]"
        for chunk in chunks:
            assert "error" not in chunk, chunk
        assert any(chunk.get("choices") for chunk in chunks)
        return
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        assert re.search(r"^# TYPE tokenstep_\w+ ", body, re.MULTILINE), f"neither JSON, SSE nor Prometheus metrics: {body[:500]}"
        return
    assert isinstance(data, dict) and "error" not in data, data
    if "choices" in data:
        assert data["choices"], data
        assert data["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("command", CURL_COMMANDS, ids=[f"curl{i}" for i in range(len(CURL_COMMANDS))])
def test_readme_curl_example(tiny_server, command):
    address = tiny_server.base_url.removeprefix("http://")
    rewritten = command.replace(README_ADDRESS, address)
    result = subprocess.run(["bash", "-c", rewritten], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{rewritten}\nexit {result.returncode}\n{result.stderr}"
    check_body(result.stdout)


def run_snippet(snippet: str, server, model: str | None) -> str:
    code = snippet.replace(f"http://{README_ADDRESS}", server.base_url)
    assert code != snippet, "the snippet's base_url was not rewritten"
    if model is not None:
        code = code.replace(f'"{DEFAULT_MODEL}"', f'"{model}"')
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{code}\nexit {result.returncode}\n{result.stderr}"
    return result.stdout


def served_counts(server) -> tuple[float, float]:
    """(requests served to their end, tokens generated) so far, from /metrics."""
    text = wait_until_idle(server)
    return metric(text, "tokenstep_e2e_request_latency_seconds_count"), metric(text, "tokenstep_generation_tokens_total")


@pytest.mark.parametrize("index", range(len(PYTHON_SNIPPETS)))
def test_readme_python_sdk_example_on_tiny(tiny_server, index):
    """The tiny model prints random text, so the server's counters are the
    check: every request the snippet makes was served to its end."""
    snippet = PYTHON_SNIPPETS[index]
    num_requests = snippet.count(".create(")
    assert num_requests >= 1, "the snippet makes no request this test can count"
    requests_before, tokens_before = served_counts(tiny_server)
    run_snippet(snippet, tiny_server, model="tiny")
    requests_after, tokens_after = served_counts(tiny_server)
    assert requests_after - requests_before == num_requests
    assert tokens_after - tokens_before >= num_requests


@pytest.mark.parametrize("index", range(len(PYTHON_SNIPPETS)))
def test_readme_python_sdk_example_on_default_model(default_server, index):
    """Unchanged but for the address: the model name the README uses must be served."""
    output = run_snippet(PYTHON_SNIPPETS[index], default_server, model=None)
    assert output.strip(), "the snippet printed no completion"

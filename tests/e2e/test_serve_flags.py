"""Serve flags reach what they configure, seen through a real ``tokenstep
serve`` (one server for the module, every flag below set on it):
``TOKENSTEP_API_KEY`` and ``--allowed-origins`` guard the running server;
``--chat-template`` replaces the model's template, and the chat fields
``add_generation_prompt``, ``continue_final_message`` and
``chat_template_kwargs`` change what it renders; ``--max-stored-responses``
evicts the oldest response; ``--block-size``, ``--dtype``,
``--no-enable-prefix-caching`` and ``--max-num-batched-tokens`` reach the
engine (its ``/stats``, its load line in the log).

``--max-stored-responses 0`` is checked in-process (tests/server/test_response_store.py).
"""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ServerProcess, running_server
from tests.e2e.test_api_misc import wait_until_idle

MODEL = "tiny"
API_KEY = "flags-key-7d41"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ORIGIN = "https://app.example"
BLOCK_SIZE = 8
KV_CACHE_MIB = 16
MAX_NUM_BATCHED_TOKENS = 16
MAX_STORED_RESPONSES = 2
# Every piece of text is a literal, so the rendered prompt is known exactly.
CHAT_TEMPLATE = (
    "{% if persona is defined %}{{ '[persona] ' + persona + '\\n' }}{% endif %}"
    "{% for message in messages %}{{ '[' + message['role'] + '] ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def flagged_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("flags")
    template = folder / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    args = [
        str(tiny_llama_dir),
        "--served-model-name", MODEL,
        "--dtype", "bfloat16",
        "--kv-cache-memory", f"{KV_CACHE_MIB}MiB",
        "--block-size", str(BLOCK_SIZE),
        "--no-enable-prefix-caching",
        "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
        "--chat-template", str(template),
        "--max-stored-responses", str(MAX_STORED_RESPONSES),
        "--allowed-origins", ORIGIN,
    ]  # fmt: skip
    yield from running_server(args, folder / "server.log", env={"TOKENSTEP_API_KEY": API_KEY})


def post(server: ServerProcess, path: str, body: dict, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=60)


def stats(server: ServerProcess) -> dict:
    wait_until_idle(server)
    response = httpx.get(f"{server.base_url}/stats", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------ auth and CORS


def test_api_key_from_the_environment_guards_the_api(flagged_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{flagged_server.base_url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", response.text
    assert httpx.get(f"{flagged_server.base_url}/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{flagged_server.base_url}/health").status_code == 200  # probes need no key
    assert API_KEY not in flagged_server.log_path.read_text()


def test_allowed_origins_on_a_running_server(flagged_server):
    base = flagged_server.base_url
    allowed = httpx.get(f"{base}/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    preflight_headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    preflight = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight_headers})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    unauthorized = httpx.get(f"{base}/v1/models", headers={"Origin": ORIGIN})
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{base}/v1/models", headers={**AUTH, "Origin": "https://other.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    refused = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": "https://other.example", **preflight_headers})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


# ------------------------------------------------------------ chat template


def rendered(server: ServerProcess, messages: list[dict], **fields) -> tuple[str, int]:
    """The prompt text the chat route would see (through /tokenize and /detokenize), and its token count."""
    tokenized = post(server, "/tokenize", {"model": MODEL, "messages": messages, **fields})
    assert tokenized.status_code == 200, tokenized.text
    tokens = tokenized.json()["tokens"]
    return post(server, "/detokenize", {"model": MODEL, "tokens": tokens}).json()["prompt"], len(tokens)


def chat_prompt_tokens(server: ServerProcess, messages: list[dict], **fields) -> int:
    response = post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1, **fields})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_chat_template_file_replaces_the_models(flagged_server):
    text, count = rendered(flagged_server, HI)
    assert text == "[user] hi\n[assistant]", "the model's own template renders <|im_start|> turns"
    plain_count = len(post(flagged_server, "/tokenize", {"model": MODEL, "prompt": text, "add_special_tokens": False}).json()["tokens"])
    assert chat_prompt_tokens(flagged_server, HI) == count == plain_count


CONTINUED = [*HI, {"role": "assistant", "content": "Once upon"}]


@pytest.mark.parametrize(
    "messages, fields, expected",
    [
        (HI, {"add_generation_prompt": False}, "[user] hi\n"),
        (CONTINUED, {"continue_final_message": True}, "[user] hi\n[assistant] Once upon"),
        (CONTINUED, {}, "[user] hi\n[assistant] Once upon\n[assistant]"),
        (HI, {"chat_template_kwargs": {"persona": "pirate"}}, "[persona] pirate\n[user] hi\n[assistant]"),
    ],
    ids=["no-generation-prompt", "continue-final-message", "default-closes-the-final-message", "template-kwargs"],
)
def test_chat_fields_change_the_rendered_prompt(flagged_server, messages, fields, expected):
    text, count = rendered(flagged_server, messages, **fields)
    assert text == expected
    assert chat_prompt_tokens(flagged_server, messages, **fields) == count


# ------------------------------------------------------------ stored responses


def test_max_stored_responses_evicts_the_oldest(flagged_server):
    base = flagged_server.base_url
    ids = [
        post(flagged_server, "/v1/responses", {"model": MODEL, "input": f"turn {i}", "max_output_tokens": 2}).json()["id"] for i in range(3)
    ]
    oldest, *kept = ids
    gone = httpx.get(f"{base}/v1/responses/{oldest}", headers=AUTH)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "response_not_found"
    follow_up = post(
        flagged_server, "/v1/responses", {"model": MODEL, "input": "and?", "previous_response_id": oldest, "max_output_tokens": 2}
    )
    assert follow_up.status_code == 404 and follow_up.json()["error"]["param"] == "previous_response_id"
    for response_id in kept:
        assert httpx.get(f"{base}/v1/responses/{response_id}", headers=AUTH).json()["id"] == response_id
    continued = post(
        flagged_server, "/v1/responses", {"model": MODEL, "input": "and?", "previous_response_id": kept[-1], "max_output_tokens": 2}
    )
    assert continued.status_code == 200, continued.text


# ------------------------------------------------------------ engine flags


def test_block_size_and_dtype_reach_the_engine(flagged_server, tiny_llama_dir: Path):
    kv = stats(flagged_server)["kv"]
    assert kv["block_size"] == BLOCK_SIZE
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    bfloat16_bytes_per_token = config["num_hidden_layers"] * config["num_key_value_heads"] * 2 * head_dim * 2  # K and V, 2 bytes each
    assert kv["blocks"] == KV_CACHE_MIB * 2**20 // (bfloat16_bytes_per_token * BLOCK_SIZE)
    assert "as torch.bfloat16" in flagged_server.log_path.read_text()


def test_prefix_caching_is_off(flagged_server):
    before = stats(flagged_server)["prefix_cache"]
    prompt = list(range(1000, 1000 + 5 * BLOCK_SIZE))  # five full blocks, twice: a hit if caching were on
    for _ in range(2):
        assert post(flagged_server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}).status_code == 200
    after = stats(flagged_server)
    assert after["prefix_cache"]["query_tokens"] > before["query_tokens"]
    assert after["prefix_cache"]["hit_tokens"] == before["hit_tokens"] == 0
    assert "c" not in after["kv"]["map"], "no finished request's blocks are kept for reuse"


def test_max_num_batched_tokens_chunks_the_prefill(flagged_server):
    num_prompt_tokens = 5 * MAX_NUM_BATCHED_TOKENS + 3
    steps_before = stats(flagged_server)["totals"]["steps"]
    body = {"model": MODEL, "prompt": list(range(2000, 2000 + num_prompt_tokens)), "max_tokens": 1}
    assert post(flagged_server, "/v1/completions", body).json()["usage"]["completion_tokens"] == 1
    # One step per chunk of at most MAX_NUM_BATCHED_TOKENS; the last chunk samples the only token.
    assert stats(flagged_server)["totals"]["steps"] - steps_before == math.ceil(num_prompt_tokens / MAX_NUM_BATCHED_TOKENS)

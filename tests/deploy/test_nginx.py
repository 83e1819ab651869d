"""The compose ``scale`` topology without containers: two ``tokenstep serve``
replicas (tiny model) on loopback ports behind Debian's nginx, configured by
the same ``docker/nginx`` template with the upstreams filled in."""

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import NginxProcess, render_template
from tests.e2e.conftest import ServerProcess, free_port

pytestmark = pytest.mark.nginx

MODEL = "tiny"


@contextmanager
def serving_replicas(model_dir: Path, logs: Path) -> Iterator[list[ServerProcess]]:
    """Two tiny-model replicas, stopped on leaving."""
    args = [str(model_dir), "--served-model-name", MODEL, "--kv-cache-memory", "16MiB", "--dtype", "float32"]
    servers = [ServerProcess(args, log_path=logs / f"replica{index}.log") for index in range(2)]
    try:
        for server in servers:  # both load at once; wait for each
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.close()


@contextmanager
def proxying(replicas: list[ServerProcess], prefix: Path) -> Iterator[NginxProcess]:
    """nginx in front of ``replicas``, stopped on leaving."""
    port = free_port()
    site = render_template([f"127.0.0.1:{server.port}" for server in replicas], f"127.0.0.1:{port}")
    proxy = NginxProcess(prefix, site, port)
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Shared by the tests that leave every replica running."""
    with serving_replicas(tiny_llama_dir, tmp_path_factory.mktemp("replica-logs")) as servers:
        yield servers


@pytest.fixture(scope="module")
def nginx(replicas: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxProcess]:
    with proxying(replicas, tmp_path_factory.mktemp("nginx")) as proxy:
        yield proxy


def address(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.port}"


def stream_completion(base_url: str, headers: dict[str, str]) -> str:
    """One streamed completion; returns its text after checking the SSE framing."""
    body = {"model": MODEL, "prompt": "Hello, my name is", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) >= 2, "expected the tokens as several events"
    return "".join(chunk["choices"][0]["text"] for chunk in chunks)


def test_streams_a_completion_through_nginx(nginx: NginxProcess, replicas: list[ServerProcess]) -> None:
    text = stream_completion(nginx.base_url, {"X-Test-Tag": "stream"})
    assert text
    [(upstreams, status, _)] = nginx.requests_tagged("stream", 1)
    assert status == 200 and upstreams[-1] in {address(server) for server in replicas}
    assert httpx.get(f"{nginx.base_url}/v1/models", timeout=10).json()["data"][0]["id"] == MODEL


def test_requests_spread_over_both_replicas(nginx: NginxProcess, replicas: list[ServerProcess]) -> None:
    # least_conn with every replica idle falls back to round robin: one after
    # another, requests alternate.
    for _ in range(8):
        stream_completion(nginx.base_url, {"X-Test-Tag": "spread"})
    served = Counter(upstreams[-1] for upstreams, _, _ in nginx.requests_tagged("spread", 8))
    assert set(served) == {address(server) for server in replicas}
    assert min(served.values()) >= 2, served


def test_session_header_keeps_a_conversation_on_one_replica(nginx: NginxProcess, replicas: list[ServerProcess]) -> None:
    sessions = [f"session-{index}" for index in range(16)]
    # Each session's turns back to back: round robin would split every pair.
    for session_id in sessions:
        for _turn in range(2):
            stream_completion(nginx.base_url, {"X-Test-Tag": "sessions", "X-Session-ID": session_id})
    replica_of: dict[str, set[str]] = {}
    for upstreams, status, session_id in nginx.requests_tagged("sessions", 32):
        assert status == 200
        replica_of.setdefault(session_id, set()).add(upstreams[-1])
    assert all(len(served) == 1 for served in replica_of.values()), replica_of
    # 16 sessions hashed over 2 replicas all landing on one: odds 2**-15.
    assert set().union(*replica_of.values()) == {address(server) for server in replicas}


def test_requests_go_to_the_surviving_replica_when_one_dies(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Kills a replica (SIGKILL, like a crash or OOM kill) of a topology of its
    own, so the shared one stays whole whatever order the tests run in."""
    (tmp_path / "nginx").mkdir()
    with serving_replicas(tiny_llama_dir, tmp_path) as replicas, proxying(replicas, tmp_path / "nginx") as nginx:
        stream_completion(nginx.base_url, {"X-Test-Tag": "pin", "X-Session-ID": "doomed"})
        [(upstreams, _, _)] = nginx.requests_tagged("pin", 1)
        victim = next(server for server in replicas if address(server) == upstreams[-1])
        survivor = next(server for server in replicas if server is not victim)
        victim.process.kill()
        victim.process.wait()

        # The session hashed to the dead replica moves on, and so does everyone else.
        for headers in [{"X-Session-ID": "doomed"}, {}, {}, {}, {"X-Session-ID": "doomed"}, {}]:
            assert stream_completion(nginx.base_url, {"X-Test-Tag": "after-kill", **headers})
        for upstreams, status, _ in nginx.requests_tagged("after-kill", 6):
            assert status == 200 and upstreams[-1] == address(survivor)

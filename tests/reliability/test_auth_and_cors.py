"""Auth: no route variant (trailing or doubled slash, case, dot segments,
HEAD/OPTIONS/other methods) reaches the engine without the key, nothing
redirects, and the key never appears in the logs or a printed settings
object. CORS stays off unless ``--allowed-origins`` names origins.

The variants go over a raw socket: an HTTP client library would normalise
the paths this test is about."""

import json
import re
import socket
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.reliability.conftest import API_KEY
from tests.reliability.support import metric

WRONG_KEY = "wrong-key-123"
ROUTES = [
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    ("POST", "/tokenize", {"model": "tiny", "prompt": "x"}),
    ("POST", "/detokenize", {"model": "tiny", "tokens": [6004]}),
    ("GET", "/v1/models", None),
]


def path_variants(path: str) -> list[str]:
    head, _, tail = path.rpartition("/")
    return [
        path + "/",
        "/" + path,
        f"{head}//{tail}",
        path.upper(),
        path[:1] + path[1:2].upper() + path[2:],
        f"{head}/./{tail}",
        f"{head}/../{head.strip('/') or 'x'}/{tail}",
        path + "%2F",
        path + ";x",
        f"{head}/{tail[0].upper()}{tail[1:]}",
    ]


def raw_request(
    base_url: str, method: str, path: str, body: dict | None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with ``path`` sent byte for byte; (status, headers, body)."""
    url = urlsplit(base_url)
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: close", f"Content-Length: {len(payload)}"]
    lines += ["Content-Type: application/json"] if body is not None else []
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, content = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), response_headers, content


def engine_counters(base_url: str) -> tuple[float, float]:
    text = httpx.get(f"{base_url}/metrics").text
    return metric(text, "tokenstep_prompt_tokens_total"), metric(text, "tokenstep_engine_steps_total")


def assert_refused(status: int, headers: dict[str, str], content: bytes, method: str, allowed: set[int]) -> None:
    assert status in allowed, (status, content[:200])
    assert "location" not in headers  # never a redirect
    if method != "HEAD" and content:
        error = json.loads(content)["error"]
        assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[path for _, path, _ in ROUTES])
def test_no_variant_reaches_the_engine_without_the_key(small_server, method, path, body):
    base = small_server.base_url
    before = engine_counters(base)
    for variant in path_variants(path):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert_refused(*raw_request(base, method, variant, body, headers), method, {400, 401, 404, 405})
    for other_method in ("HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "GET" if method == "POST" else "POST"):
        assert_refused(*raw_request(base, other_method, path, body), other_method, {401, 405})
    # Spellings that decode to the route itself still need the key.
    encoded = path[:-1] + "%" + format(ord(path[-1]), "02x")
    for same_route in (encoded, path + "?x=1"):
        assert_refused(*raw_request(base, method, same_route, body), method, {401})
    assert engine_counters(base) == before, "a request without the key reached the engine"


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[path for _, path, _ in ROUTES])
def test_with_the_key_only_the_exact_route_answers(small_server, method, path, body):
    base, auth = small_server.base_url, {"Authorization": f"Bearer {API_KEY}"}
    status, _, content = raw_request(base, method, path, body, auth)
    assert status == 200, content[:300]
    for variant in path_variants(path):
        status, headers, content = raw_request(base, method, variant, body, auth)
        assert status in {400, 404, 405}, (variant, status)
        assert "location" not in headers


def test_the_key_is_never_logged(small_server):
    """Both requests (right key, wrong key) reach the debug-level log, and
    neither key appears in it."""
    request_ids = {API_KEY: f"keyed-{uuid.uuid4().hex}", WRONG_KEY: f"unkeyed-{uuid.uuid4().hex}"}
    for key, request_id in request_ids.items():
        httpx.post(
            f"{small_server.base_url}/v1/completions",
            json={"prompt": "x", "max_tokens": 1},
            headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id},
        )
    deadline = time.monotonic() + 10
    log = small_server.log_path.read_text()
    while not all(request_id in log for request_id in request_ids.values()):
        assert time.monotonic() < deadline, "the access lines of this test's requests never reached the log"
        time.sleep(0.05)
        log = small_server.log_path.read_text()
    assert f"request_id={request_ids[WRONG_KEY]} POST /v1/completions 401" in log
    assert re.search(r"DEBUG tokenstep\.access: request_id=\S+ GET /health ", log), "the debug-level access lines are on"
    assert API_KEY not in log and WRONG_KEY not in log
    settings = Settings(api_key=API_KEY)
    assert API_KEY not in repr(settings) and API_KEY not in str(settings)


# ---------------------------------------------------------------------- CORS


async def cors_client(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(settings)), base_url="http://tokenstep.test")


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.mark.asyncio(loop_scope="session")
async def test_cors_is_off_by_default():
    async with await cors_client(Settings()) as client:
        response = await client.get("/metrics", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
        preflight = await client.options("/v1/completions", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


@pytest.mark.asyncio(loop_scope="session")
async def test_cors_allows_only_the_given_origins():
    async with await cors_client(Settings(allowed_origins="https://app.example, https://other.example", api_key="k")) as client:
        response = await client.get("/metrics", headers={"Origin": "https://other.example"})
        assert response.headers["access-control-allow-origin"] == "https://other.example"
        preflight = await client.options("/v1/completions", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
        refused = await client.get("/metrics", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in refused.headers
        assert (await client.options("/v1/completions", headers={"Origin": "https://evil.example", **PREFLIGHT})).status_code == 400
        # Errors carry CORS headers too, so a browser app can read them.
        unauthorized = await client.post("/v1/completions", json={}, headers={"Origin": "https://app.example"})
        assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.asyncio(loop_scope="session")
async def test_cors_lets_a_browser_send_the_anthropic_sdks_headers():
    """The anthropic SDK in a browser sends x-api-key, anthropic-version and
    anthropic-beta: the preflight must allow them, and refuse others."""
    async with await cors_client(Settings(allowed_origins="https://app.example")) as client:
        anthropic_headers = "content-type, x-api-key, anthropic-version, anthropic-beta"
        preflight = await client.options(
            "/v1/messages",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": anthropic_headers,
            },
        )
        assert preflight.status_code == 200
        allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].lower().split(",")}
        assert {"x-api-key", "anthropic-version", "anthropic-beta"} <= allowed
        other = await client.options(
            "/v1/messages",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-unknown",
            },
        )
        assert other.status_code == 400

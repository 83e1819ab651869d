"""API key auth: ``/v1`` routes need ``Authorization: Bearer <key>``;
``/health`` stays open."""

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import pytest_asyncio

from server.app import create_app
from server.settings import Settings
from server.state import Served
from tests.server.conftest import running

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = "sekret"
REQUEST = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(make_served: Callable[[], Served]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(api_key=KEY), ready=make_served())
    async with running(app) as client:
        yield client


def assert_auth_error(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    assert body["error"]["message"]


async def test_missing_key_is_401(client):
    assert_auth_error(await client.post("/v1/completions", json=REQUEST))


@pytest.mark.parametrize(
    "header",
    ["Bearer wrong", "Bearer sekret2", "Bearer sekre", "Bearer ", "Basic sekret", "sekret", "Bearer\tsekret"],
)
async def test_wrong_key_is_401(client, header):
    assert_auth_error(await client.post("/v1/completions", json=REQUEST, headers={"Authorization": header}))


async def test_auth_is_checked_before_the_body_is_validated(client):
    # An unauthenticated client learns nothing about the request schema.
    assert_auth_error(await client.post("/v1/completions", json={"temperature": 99}))


async def test_right_key_is_200(client):
    response = await client.post("/v1/completions", json=REQUEST, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


async def test_bearer_scheme_is_case_insensitive(client):
    response = await client.post("/v1/completions", json=REQUEST, headers={"Authorization": f"bearer {KEY}"})
    assert response.status_code == 200, response.text


async def test_health_needs_no_key(client):
    response = await client.get("/health")
    assert response.status_code == 200

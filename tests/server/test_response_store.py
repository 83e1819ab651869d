"""``ResponseStore``: the bounded LRU behind ``previous_response_id``, and
``--max-stored-responses 0`` through the app (a small N: tests/e2e/test_serve_flags.py)."""

from collections.abc import Callable

import pytest

from server.app import create_app
from server.cli import parse_settings
from server.response_store import ResponseStore, StoredResponse
from server.state import Served
from tests.server.conftest import running


def test_response_store_evicts_the_least_recently_used() -> None:
    store = ResponseStore(max_responses=2)
    for name in ("a", "b"):
        store.put(StoredResponse({"id": name}, []))
    assert store.get("a") is not None  # "a" is now the most recent
    store.put(StoredResponse({"id": "c"}, []))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert store.delete("a") and not store.delete("a")


@pytest.mark.asyncio(loop_scope="session")
async def test_max_stored_responses_0_stores_nothing(make_served: Callable[[], Served]):
    """``--max-stored-responses 0`` through the app: a response is answered
    but cannot be retrieved or continued."""
    settings = parse_settings(["--max-stored-responses", "0"])
    async with running(create_app(settings, ready=make_served())) as client:
        created = await client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2})
        assert created.status_code == 200, created.text
        response_id = created.json()["id"]
        retrieved = await client.get(f"/v1/responses/{response_id}")
        assert retrieved.status_code == 404 and retrieved.json()["error"]["code"] == "response_not_found"
        follow_up = await client.post("/v1/responses", json={"input": "and?", "previous_response_id": response_id, "max_output_tokens": 2})
        assert follow_up.status_code == 404 and follow_up.json()["error"]["param"] == "previous_response_id"

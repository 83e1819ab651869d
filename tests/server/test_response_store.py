"""``ResponseStore``: the bounded LRU behind ``previous_response_id``."""

from server.response_store import ResponseStore, StoredResponse


def test_response_store_evicts_the_least_recently_used() -> None:
    store = ResponseStore(max_responses=2)
    for name in ("a", "b"):
        store.put(StoredResponse({"id": name}, []))
    assert store.get("a") is not None  # "a" is now the most recent
    store.put(StoredResponse({"id": "c"}, []))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert store.delete("a") and not store.delete("a")

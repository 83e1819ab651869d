"""Stored responses for ``/v1/responses``: bounded, in memory, LRU.

A stored entry is the response object as returned to the client plus the
conversation it ended (the chat-shaped messages of every earlier turn, this
turn's input and this turn's output), which is what ``previous_response_id``
continues from. Nothing is persisted: a restart forgets every response, and
past ``--max-stored-responses`` the least recently used one is evicted (a
later reference to it is a 404, as for an id that never existed).
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, max_responses: int) -> None:
        self.max_responses = max_responses
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: StoredResponse) -> None:
        response_id = entry.response["id"]
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.max_responses:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None

"""Stop strings: which text a request may still show.

``StopStringMatcher`` sits after the ``IncrementalDetokenizer``: text pieces
in, text safe to stream out. It holds back any tail that could begin a stop
string, so no part of a stop string ever reaches the client, and reports the
stop string once the text contains it. Its matching is pure functions
(``find_stop_string``, ``stop_prefix_length``); the class only keeps the
held-back tail between pieces. The engine turns a match into a
``batching.stop.StopDecision``.
"""


def find_stop_string(text: str, stop: tuple[str, ...]) -> tuple[int, str] | None:
    """The first stop string to complete in ``text``: ``(start index, stop string)``.

    "First" means the occurrence that ends earliest, the one generation reaches
    first, so streaming and non-streaming agree; among occurrences ending at
    the same place the longest (earliest start) wins. ``None`` if none occurs.
    """
    best: tuple[int, int, str] | None = None  # (end, start, stop string)
    for stop_string in stop:
        start = text.find(stop_string)
        if start < 0:
            continue
        candidate = (start + len(stop_string), start, stop_string)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def stop_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop_string in stop:
        for length in range(min(len(stop_string) - 1, len(text)), longest, -1):
            if text.endswith(stop_string[:length]):
                longest = length
                break
    return longest


class StopStringMatcher:
    """Per-request filter that cuts the streamed text at the first stop string.

    Invariant: ``_held_text`` is the longest tail of the text fed so far that
    could still begin a stop string; everything before it has been emitted.
    Fed text is held at most as long as the longest stop string minus one
    character. With no stop strings, ``feed`` passes text straight through.
    After a match the matcher is stopped: ``feed`` and ``flush`` return nothing.
    """

    __slots__ = ("_stop", "_held_text", "_is_stopped")

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._held_text = ""
        self._is_stopped = False

    @property
    def is_stopped(self) -> bool:
        return self._is_stopped

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Take newly detokenized text; return ``(text safe to emit, matched stop or None)``.

        On a match the returned text ends right before the stop string, and the
        caller finishes the request.
        """
        if self._is_stopped:
            return "", None
        if not self._stop:
            return new_text, None
        text = self._held_text + new_text
        match = find_stop_string(text, self._stop)
        if match is not None:
            start, stop_string = match
            self._held_text = ""
            self._is_stopped = True
            return text[:start], stop_string
        num_held = stop_prefix_length(text, self._stop)
        self._held_text = text[len(text) - num_held :]
        return text[: len(text) - num_held], None

    def flush(self) -> str:
        """Return the held-back tail, for a request that finished for another reason."""
        held_text, self._held_text = self._held_text, ""
        return held_text

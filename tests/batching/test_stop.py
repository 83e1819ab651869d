"""Stop checks: token stops on hand-built requests, stop strings on text pieces,
and the detokenizer -> stop-string pipeline on the real tokenizer."""

import pytest
from transformers import PreTrainedTokenizerBase

from batching.detokenizer import IncrementalDetokenizer
from batching.request import Request, RequestStatus
from batching.sampling_params import SamplingParams
from batching.stop import StopDecision, check_token_stop
from batching.stop_strings import StopStringMatcher, find_stop_string, stop_prefix_length

EOS = 2
STOP_TOKEN = 7
OTHER_TOKEN = 100


def create_request(eos_token_id: int | None = EOS, **params: object) -> Request:
    return Request("req-0", [11, 12, 13], SamplingParams(**params), eos_token_id=eos_token_id)


def append_token(request: Request, token_id: int) -> StopDecision | None:
    request.output_token_ids.append(token_id)
    return check_token_stop(request, token_id)


def stream_text(stop: tuple[str, ...], pieces: list[str]) -> tuple[str, str | None]:
    """Everything a client sees when ``pieces`` are fed one by one, and the matched stop."""
    matcher = StopStringMatcher(stop)
    emitted: list[str] = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched is not None:
            return "".join(emitted), matched
    return "".join(emitted) + matcher.flush(), None


# --- token stops ---------------------------------------------------------------


def test_eos_stops_with_no_stop_reason() -> None:
    request = create_request(max_tokens=10)
    assert append_token(request, OTHER_TOKEN) is None
    assert append_token(request, EOS) == StopDecision(RequestStatus.FINISHED_STOPPED, None)


def test_eos_before_min_tokens_does_not_stop() -> None:
    request = create_request(max_tokens=10, min_tokens=3)
    assert append_token(request, EOS) is None
    assert append_token(request, EOS) is None
    assert append_token(request, EOS) == StopDecision(RequestStatus.FINISHED_STOPPED)


def test_ignore_eos_runs_to_max_tokens() -> None:
    request = create_request(max_tokens=3, ignore_eos=True)
    assert append_token(request, EOS) is None
    assert append_token(request, EOS) is None
    assert append_token(request, EOS) == StopDecision(RequestStatus.FINISHED_LENGTH)


def test_request_without_eos_token_never_stops_on_it() -> None:
    request = create_request(eos_token_id=None, max_tokens=5)
    assert append_token(request, EOS) is None


def test_stop_token_ids_stop_and_name_the_token() -> None:
    request = create_request(max_tokens=10, stop_token_ids=(STOP_TOKEN, 8))
    assert append_token(request, OTHER_TOKEN) is None
    decision = append_token(request, STOP_TOKEN)
    assert decision == StopDecision(RequestStatus.FINISHED_STOPPED, stop_reason=STOP_TOKEN)


def test_stop_token_respects_min_tokens_and_ignores_ignore_eos() -> None:
    request = create_request(max_tokens=10, min_tokens=2, stop_token_ids=(STOP_TOKEN,), ignore_eos=True)
    assert append_token(request, STOP_TOKEN) is None
    assert append_token(request, STOP_TOKEN) == StopDecision(RequestStatus.FINISHED_STOPPED, stop_reason=STOP_TOKEN)


def test_max_tokens_gives_length() -> None:
    request = create_request(max_tokens=2)
    assert append_token(request, OTHER_TOKEN) is None
    decision = append_token(request, OTHER_TOKEN)
    assert decision == StopDecision(RequestStatus.FINISHED_LENGTH)
    assert decision.status.finish_reason == "length"


def test_eos_on_the_last_allowed_token_is_a_stop_not_length() -> None:
    request = create_request(max_tokens=1)
    assert append_token(request, EOS) == StopDecision(RequestStatus.FINISHED_STOPPED)


# --- pure stop-string helpers --------------------------------------------------


def test_find_stop_string_earliest_occurrence_wins() -> None:
    assert find_stop_string("hello world", ("world", "lo")) == (3, "lo")
    assert find_stop_string("hello world", ("lo", "world")) == (3, "lo")
    assert find_stop_string("hello world", ("xyz",)) is None


def test_find_stop_string_prefers_the_stop_that_completes_first() -> None:
    # "y" completes before "xyz" does, so generation would have stopped there.
    assert find_stop_string("axyz", ("xyz", "y")) == (2, "y")
    # Same end: the longer (earlier-starting) stop wins.
    assert find_stop_string("abc", ("bc", "abc")) == (0, "abc")


def test_stop_prefix_length() -> None:
    assert stop_prefix_length("hello </", ("</s>",)) == 2
    assert stop_prefix_length("hello <", ("</s>", "<|end|>")) == 1
    assert stop_prefix_length("hello <|en", ("</s>", "<|end|>")) == 4
    assert stop_prefix_length("hello", ("</s>",)) == 0
    assert stop_prefix_length("ab", ("abc",)) == 2


# --- StopStringMatcher ---------------------------------------------------------


def test_no_stop_strings_is_a_pass_through() -> None:
    matcher = StopStringMatcher(())
    assert matcher.feed("Hello <") == ("Hello <", None)
    assert matcher.feed("/s>") == ("/s>", None)
    assert matcher.flush() == ""


def test_stop_string_across_two_pieces_is_cut_cleanly() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("Hello ST") == ("Hello ", None)
    assert matcher.feed("OP and more") == ("", "STOP")
    assert matcher.is_stopped


def test_stop_string_across_three_pieces() -> None:
    matcher = StopStringMatcher(("<|end|>",))
    assert matcher.feed("Done <|") == ("Done ", None)
    assert matcher.feed("en") == ("", None)
    assert matcher.feed("d|> trailing") == ("", "<|end|>")


def test_false_prefix_is_released_later() -> None:
    matcher = StopStringMatcher(("</s>",))
    assert matcher.feed("a <") == ("a ", None)
    assert matcher.feed("/") == ("", None)
    assert matcher.feed("b> c") == ("</b> c", None)


def test_flush_returns_held_text() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("the end ST") == ("the end ", None)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_nothing_after_a_match() -> None:
    matcher = StopStringMatcher(("!",))
    assert matcher.feed("hi! there") == ("hi", "!")
    assert matcher.feed("more") == ("", None)
    assert matcher.flush() == ""


CASES = [
    (("STOP",), "Hello world STOP and the rest"),
    (("STOP",), "SSTSTOSTO never quite STO"),
    (("</s>", "<|end|>"), "a <b> </ <|en <|end|> tail </s>"),
    (("xyz", "y"), "abxyz"),
    (("abc", "bc"), "zzabcd"),
    (("\n\n",), "line one\nline two\n\nline three"),
    (("ab", "ba"), "aaaabbbb"),
]


@pytest.mark.parametrize(("stop", "text"), CASES)
def test_streaming_equals_non_streaming(stop: tuple[str, ...], text: str) -> None:
    expected = stream_text(stop, [text])
    for split in range(len(text) + 1):
        assert stream_text(stop, [text[:split], text[split:]]) == expected
    for first in range(len(text)):
        for second in range(first, len(text)):
            pieces = [text[:first], text[first:second], text[second:]]
            assert stream_text(stop, pieces) == expected
    assert stream_text(stop, list(text)) == expected


# --- with the real tokenizer ---------------------------------------------------


def detokenize_and_stop(tokenizer: PreTrainedTokenizerBase, text: str, stop: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Stream ``text`` token by token through the detokenizer and the stop matcher."""
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"))
    matcher = StopStringMatcher(stop)
    pieces: list[str] = []
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        emitted, matched = matcher.feed(detokenizer.step([token_id]))
        pieces.append(emitted)
        if matched is not None:
            return pieces, matched
    emitted, matched = matcher.feed(detokenizer.flush())
    return pieces + [emitted, matcher.flush()], matched


def test_emoji_stop_string_split_across_byte_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Hello 😀 world"
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokenizer.encode(text)[1:])
    pieces, matched = detokenize_and_stop(tokenizer, text, ("😀",))
    assert matched == "😀"
    assert "".join(pieces) == "Hello "
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_string_across_tokens_with_real_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "The answer is 42.\n\nUser: next question 你好"
    pieces, matched = detokenize_and_stop(tokenizer, text, ("\nUser:",))
    assert matched == "\nUser:"
    assert "".join(pieces) == "The answer is 42.\n"


def test_no_match_streams_everything_whole(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "你好世界 and 😀 but no stop here"
    pieces, matched = detokenize_and_stop(tokenizer, text, ("STOP", "世界!"))
    assert matched is None
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)

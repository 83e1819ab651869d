"""Logprobs on the wire: engine ``TokenLogprobs`` -> OpenAI's chat shape
(``token``, ``logprob``, ``bytes``, ``top_logprobs``) and the legacy
completions shape (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``).

Token strings and bytes come from ``server.token_bytes.TokenBytes``: a token
holding part of a UTF-8 character carries its real bytes (its ``token`` shows
them as ``\\xNN``), so joining every token's ``bytes`` rebuilds the text. A
special token that ``skip_special_tokens`` leaves out of the text has
``bytes: null`` and adds nothing to ``text_offset``.
"""

from batching.messages import TokenLogprobs
from server.protocol import ChatChoiceLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.token_bytes import TextOffsets, TokenBytes


def top_logprob(token_bytes: TokenBytes, token_id: int, logprob: float, skip_special_tokens: bool = True) -> TopLogprob:
    raw = token_bytes.text_bytes(token_id, skip_special_tokens)
    return TopLogprob(token=token_bytes.token_text(token_id), logprob=logprob, bytes=None if raw is None else list(raw))


def chat_logprobs(token_bytes: TokenBytes, items: list[TokenLogprobs], skip_special_tokens: bool = True) -> ChatChoiceLogprobs:
    content = []
    for item in items:
        chosen = top_logprob(token_bytes, item.token_id, item.logprob, skip_special_tokens)
        top = [top_logprob(token_bytes, token_id, logprob, skip_special_tokens) for token_id, logprob in item.top]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


class LegacyLogprobs:
    """Builds one completion choice's legacy logprobs, token by token, with
    ``text_offset`` counted in characters of the choice's text (echoed prompt
    first, when there is one)."""

    def __init__(self, token_bytes: TokenBytes, skip_special_tokens: bool = True) -> None:
        self._token_bytes = token_bytes
        self._skip_special_tokens = skip_special_tokens
        self._offsets = TextOffsets()

    def append(self, logprobs: CompletionLogprobs, token_id: int, item: TokenLogprobs | None) -> None:
        """``item`` None: the token has no logprob (the first prompt token)."""
        token_text = self._token_bytes.token_text(token_id)
        logprobs.tokens.append(token_text)
        logprobs.token_logprobs.append(None if item is None else item.logprob)
        top = None if item is None else {self._token_bytes.token_text(t): lp for t, lp in item.top} | {token_text: item.logprob}
        logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(self._offsets.next_offset(self._token_bytes.text_bytes(token_id, self._skip_special_tokens)))

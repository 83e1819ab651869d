"""Structured output: grammars that constrain a request's tokens one by one.

A request with ``SamplingParams.guided`` gets a ``GrammarMatcher`` (an
llguidance matcher) when it is made. Each step the scheduler asks the matcher
of every constrained chunk that samples which tokens may come next
(``next_token_bitmask``: bytes, sent to the runner in the chunk), and the
sampler masks every other logit to -inf; after the step the engine feeds
the sampled token back with ``accept``. EOS is in the mask exactly when the
grammar accepts the text so far; once the grammar can take nothing more
(``is_stopped``), the engine finishes the request with ``finish_reason: stop``
without waiting for an EOS step.

Why llguidance (docs/STRUCTURED_OUTPUT.md has the numbers): a 3 MB wheel with
no dependencies (xgrammar pulls in torch, triton and tvm-ffi, about 1 GB), MIT
licence, JSON schema, regex and Lark grammars with clear errors, and a mask
for a 49k vocabulary in well under a millisecond per row on this CPU.

Nothing here touches tensors, and no matcher crosses into the runner: only
its bitmask does. Matchers are compiled off the event loop (``GrammarCompiler.matcher``
may take a while for big schemas) and compiled grammars are cached, so the
same schema sent again costs one ``deep_copy``.
"""

import json
import threading
from collections import OrderedDict
from copy import copy
from dataclasses import dataclass
from typing import Any

import llguidance

from batching.errors import InvalidRequestError

# Between JSON tokens the grammar allows a short run of whitespace, not any
# amount: models (small ones especially) otherwise fill max_tokens with
# newlines, a well-known failure of "any whitespace" JSON grammars.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
_JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}
_CACHE_SIZE = 64


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """A request's output constraint, as an llguidance grammar string.

    Build one with the class methods; ``param`` names the request field a
    compile error is reported against.
    """

    grammar: str
    param: str
    description: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, param: str = "response_format") -> "GuidedDecoding":
        if schema is True or schema == {}:
            schema = {}
        if not isinstance(schema, dict):
            raise InvalidRequestError("the JSON schema must be an object", param=param)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequestError(f"invalid JSON schema: {exc}", param=param) from None
        return cls(grammar, param, "JSON schema")

    @classmethod
    def json_object(cls, param: str = "response_format") -> "GuidedDecoding":
        return cls.json_schema({"type": "object"}, param)

    @classmethod
    def regex(cls, pattern: str, param: str = "guided_regex") -> "GuidedDecoding":
        return cls(llguidance.LLMatcher.grammar_from_regex(pattern), param, "regex")

    @classmethod
    def choice(cls, choices: list[str], param: str = "guided_choice") -> "GuidedDecoding":
        if not choices:
            raise InvalidRequestError("guided_choice needs at least one choice", param=param)
        alternatives = " | ".join(json.dumps(choice) for choice in choices)
        return cls(llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}"), param, "choice")

    @classmethod
    def lark(cls, grammar: str, param: str = "guided_grammar", description: str = "grammar") -> "GuidedDecoding":
        return cls(llguidance.LLMatcher.grammar_from_lark(grammar), param, description)


_OPEN_KEYWORDS = ("additionalProperties", "unevaluatedProperties", "patternProperties")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LITERALS = ("enum", "const", "default", "examples")


def closed_objects(schema: Any, is_all_of_branch: bool = False) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that
    lists ``properties`` and says nothing about extra ones.

    Plain JSON schema allows any extra property there, and a constrained
    model will happily invent them until max_tokens; users who list
    properties mean "these". xgrammar (vLLM's default backend) does the same
    in its default strict mode. The branches of an ``allOf`` stay open:
    closing one would reject the other branches' properties.
    """
    if isinstance(schema, list):
        return [closed_objects(item, is_all_of_branch) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            closed[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key in _LITERALS:
            closed[key] = value
        else:
            closed[key] = closed_objects(value, key == "allOf")
    if "properties" in schema and not is_all_of_branch and not any(key in schema for key in _OPEN_KEYWORDS):
        closed["additionalProperties"] = False
    return closed


class GrammarMatcher:
    """One request's position in its grammar."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def next_token_bitmask(self) -> bytes:
        """The allowed-next-token bitmask: little-endian int32 words, bit
        ``t % 32`` of word ``t // 32`` is token t (a word may follow the
        vocabulary's last; the sampler reads the words it needs)."""
        return self._matcher.compute_bitmask()

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False (and an error state) if the
        grammar forbids it."""
        return self._matcher.consume_token(token_id)

    @property
    def is_stopped(self) -> bool:
        """Nothing more may be generated (the text is complete, or an error)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class GrammarCompiler:
    """Compiles ``GuidedDecoding`` grammars for one tokenizer, with an LRU cache.

    ``tokenizer`` is a Hugging Face fast tokenizer; ``vocab_size`` is the
    number of logit columns the sampler keeps, so masks line up with them.
    The llguidance tokenizer (about 0.4 s to build) is made on first use.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, guided: GuidedDecoding) -> GrammarMatcher:
        """A fresh matcher for ``guided``; ``InvalidRequestError`` if the grammar
        does not compile. Thread-safe; may take long for a big grammar the
        first time, so call it off the event loop."""
        with self._lock:
            template = self._compiled.get(guided.grammar)
            if template is not None:
                self._compiled.move_to_end(guided.grammar)
                return GrammarMatcher(template.deep_copy())
            template = llguidance.LLMatcher(self._tokenizer(), guided.grammar, log_level=0)
            if template.is_error():
                raise InvalidRequestError(f"invalid {guided.description}: {template.get_error()}", param=guided.param)
            self._compiled[guided.grammar] = template
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
            return GrammarMatcher(template.deep_copy())

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            backend = getattr(self._hf_tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise InvalidRequestError(
                    "structured output needs a fast (Rust) tokenizer, and this model's is not one", param="response_format"
                )
            backend = copy(backend)  # padding or truncation settings would leak into the grammar's view
            backend.no_padding()
            backend.no_truncation()
            eos = self._eos_token_ids or None
            self._ll_tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        return self._ll_tokenizer

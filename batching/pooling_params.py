"""``PoolingParams``: what a pooling request (an embedding) asks of the
runner instead of sampling.

A pooling request runs its whole input in one step (a prefill that samples
nothing), and the runner answers it with one pooled vector: the model's
hidden states pooled and normalized as the checkpoint says
(``model_runtime.pooling``). Validated at construction; an invalid value
raises ``InvalidRequestError`` (HTTP 400) naming the field.
"""

from dataclasses import dataclass

from batching.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class PairMessages:
    """How a reranker built on a causal LM reads a (query, document) pair:
    the chat template renders ``[system: system_prompt]`` (when there is
    one), ``[query]`` and ``[document]`` messages, with ``template_kwargs``
    (name, value pairs) passed to it (``model_runtime.pooling.logit_score``)."""

    system_prompt: str | None
    template_kwargs: tuple[tuple[str, object], ...] = ()

    def messages(self, query: str, document: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "query", "content": query}, {"role": "document", "content": document}]


@dataclass(frozen=True, slots=True)
class PoolingModel:
    """What the engine knows of the pooling model it serves: its task
    (``embed``: a vector per input; ``score``: a cross-encoder's score per
    text pair), the length of what it returns, and whether vectors may be
    cut shorter (a Matryoshka model, trained so that a prefix of the vector
    is an embedding too)."""

    task: str
    num_dimensions: int
    is_matryoshka: bool = False
    # A reranker built on a causal LM: pairs are rendered as chat messages (None: as the tokenizer's text pair).
    pair_messages: PairMessages | None = None

    @property
    def routes(self) -> str:
        """What it serves, for messages and the start log."""
        if self.task == "embed":
            return "/v1/embeddings (and /v1/rerank, /v1/score by cosine similarity)"
        return "/v1/rerank and /v1/score"

    def check(self, params: "PoolingParams") -> None:
        """Raise ``InvalidRequestError`` unless this model can answer ``params``."""
        dimensions = params.dimensions
        if dimensions is None or dimensions == self.num_dimensions:
            return
        if not self.is_matryoshka:
            raise InvalidRequestError(
                f"dimensions: this model was not trained for shortened embeddings (Matryoshka); its vectors have "
                f"{self.num_dimensions} values",
                param="dimensions",
            )
        if dimensions > self.num_dimensions:
            raise InvalidRequestError(f"dimensions: must be at most {self.num_dimensions}", param="dimensions")


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """``dimensions``: keep the vector's first ``dimensions`` values (a
    Matryoshka model's truncation, re-normalized where the model
    normalizes); None keeps them all. ``second_text_start``: for a text pair
    scored by a cross-encoder whose tokenizer marks the second text with
    token type 1 (BERT's), the position where that text starts."""

    dimensions: int | None = None
    second_text_start: int | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and self.dimensions < 1:
            raise InvalidRequestError("dimensions: must be at least 1", param="dimensions")

"""Bench prompts: random token ids, random text, or rows of a JSONL file.

A ``BenchPrompt`` is plain data: the prompt (token ids or text), its input
length in tokens and how many tokens to ask for.

Random prompts, and why they are built this way:

- Token ids (completions endpoint, server with ``POST /tokenize``): the server
  tokenizes ``SAMPLE_TEXT`` once (``add_special_tokens: false``) and every
  prompt is ``input_len`` ids drawn uniformly, with replacement, from the ids
  seen. Ids that came out of tokenizing ordinary text are valid for that
  tokenizer and never special (no stray EOS or chat markers), and sending ids
  makes the prompt exactly ``input_len`` tokens whatever the tokenizer merges.
  Independent draws from a few hundred ids make shared prefixes between
  prompts (prefix-cache hits) vanishingly rare.
- Text (chat endpoint, or no ``/tokenize``): random words of ``SAMPLE_TEXT``,
  as many as ``input_len / tokens_per_word``, where ``tokens_per_word`` was
  measured on ``SAMPLE_TEXT`` through ``/tokenize`` when available (else
  ``DEFAULT_TOKENS_PER_WORD``). The length is then about ``input_len``; the
  server's usage report, when present, gives the exact count.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TOKENS_PER_WORD = 1.3

SAMPLE_TEXT = (
    "The harbor town woke slowly under a pale winter sky. Fishermen checked their nets, "
    "bakers pulled warm bread from stone ovens, and children ran along the narrow cobbled "
    "streets toward the old schoolhouse. A lighthouse keeper named Elena climbed the spiral "
    "staircase every evening, counting one hundred and twelve steps, to polish the great lens "
    "and light the lamp that guided ships past the jagged reef. Scientists later measured the "
    "tides, the salinity of the water, and the migration of seabirds; their careful notebooks "
    "described temperature, pressure, humidity, wind direction and the slow erosion of granite "
    "cliffs. Meanwhile, merchants traded copper, wool, spices, glass, timber and silver across "
    "distant markets, negotiating prices in several languages. Musicians played violins, drums "
    "and flutes at the autumn festival while engineers designed bridges, railways, telescopes "
    "and efficient windmills. Libraries collected manuscripts about astronomy, philosophy, "
    "mathematics, medicine, geography and history, inviting curious students to explore "
    "questions nobody had answered yet. Quickly, quietly, the evening fog rolled over purple "
    "hills, yellow meadows and frozen lakes, hiding foxes, owls, wolves and deer beneath "
    "ancient oak trees. Every journey begins with uncertainty, patience, courage and a map."
)


@dataclass(frozen=True)
class BenchPrompt:
    """One request's prompt: token ids (exactly ``input_len`` of them) or text.

    ``extra_body``: fields merged into this request's JSON (``--extra-body``).
    """

    prompt: str | list[int]
    input_len: int
    output_len: int
    extra_body: dict[str, Any] | None = None

    @property
    def is_token_ids(self) -> bool:
        return isinstance(self.prompt, list)


def sample_words() -> list[str]:
    """The words of ``SAMPLE_TEXT``, punctuation kept."""
    return SAMPLE_TEXT.split()


def random_token_prompts(vocab_ids: list[int], num_prompts: int, input_len: int, output_len: int, seed: int) -> list[BenchPrompt]:
    """``num_prompts`` prompts of exactly ``input_len`` ids drawn from ``vocab_ids``."""
    if not vocab_ids:
        raise ValueError("no token ids to sample from")
    rng = random.Random(seed)
    return [BenchPrompt(rng.choices(vocab_ids, k=input_len), input_len, output_len) for _ in range(num_prompts)]


def random_text_prompts(
    num_prompts: int, input_len: int, output_len: int, seed: int, tokens_per_word: float = DEFAULT_TOKENS_PER_WORD
) -> list[BenchPrompt]:
    """``num_prompts`` texts of random words, about ``input_len`` tokens each."""
    rng = random.Random(seed)
    words = sample_words()
    num_words = max(1, round(input_len / tokens_per_word))
    return [BenchPrompt(" ".join(rng.choices(words, k=num_words)), input_len, output_len) for _ in range(num_prompts)]


def load_jsonl_prompts(
    path: Path, num_prompts: int, output_len: int, tokens_per_word: float = DEFAULT_TOKENS_PER_WORD
) -> list[BenchPrompt]:
    """Prompts from a JSONL file, one object per line, in file order.

    Each row needs ``"prompt"`` (text or a list of token ids) and may set
    ``"output_len"`` (default: ``output_len``) and ``"input_len"`` (default:
    the id count, or an estimate from the word count for text). The file is
    repeated when it has fewer rows than ``num_prompts``.
    """
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no rows")
    prompts = [_row_prompt(row, output_len, tokens_per_word, f"{path}:{i + 1}") for i, row in enumerate(rows)]
    return [prompts[i % len(prompts)] for i in range(num_prompts)]


def _row_prompt(row: object, output_len: int, tokens_per_word: float, where: str) -> BenchPrompt:
    if not isinstance(row, dict) or "prompt" not in row:
        raise ValueError(f"{where}: expected an object with a 'prompt' field")
    prompt = row["prompt"]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        default_len = len(prompt)
    elif isinstance(prompt, str):
        default_len = max(1, round(len(prompt.split()) * tokens_per_word))
    else:
        raise ValueError(f"{where}: 'prompt' must be a string or a list of token ids")
    return BenchPrompt(prompt, int(row.get("input_len", default_len)), int(row.get("output_len", output_len)))

"""A causal LM as a reranker, as sentence-transformers 6 saves one
(``modules.json``: a ``Transformer`` running ``text-generation``, then a
``LogitScore``; Qwen3-Reranker's way of scoring): a (query, document) pair
is rendered by the tokenizer's chat template as the messages
``[system: the default prompt, if any] [query] [document]`` (with the
template arguments the checkpoint saves), and its score is the logit of
``true_token_id`` ("yes") at the last token, less that of
``false_token_id`` ("no") if there is one, through the activation the
checkpoint names (a sigmoid by default).

What the server needs to render pairs travels as plain data
(``PairMessages``, on ``batching.pooling_params.PoolingModel``); the runner
needs only the head. Refused at load: a template's structured message
format, a tokenizer without a chat template (sentence-transformers then
tokenizes text, another rendering), and any activation but a sigmoid or
none.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batching.pooling_params import PairMessages
from model_runtime.pooling.config import ACTIVATIONS


@dataclass(frozen=True, slots=True)
class LogitScoreHead:
    """``true_token_id`` / ``false_token_id``: the vocabulary ids whose
    logits at a pair's last token make its score; ``activation``:
    ``sigmoid`` or ``identity``; ``pair_messages``: how the server renders
    a pair."""

    true_token_id: int
    false_token_id: int | None
    activation: str
    pair_messages: PairMessages
    max_input_tokens: int | None = None
    source: str = "modules.json's LogitScore"
    task = "score"

    def describe(self) -> str:
        against = f" less token {self.false_token_id}'s" if self.false_token_id is not None else ""
        return (
            f"a causal LM's logit of token {self.true_token_id}{against} at the pair's last token, then {self.activation} ({self.source})"
        )

    def scores(self, last_logits: torch.Tensor) -> torch.Tensor:
        """``last_logits`` [B, vocab] at each pair's last token -> scores [B, 1]."""
        scores = last_logits[:, self.true_token_id]
        if self.false_token_id is not None:
            scores = scores - last_logits[:, self.false_token_id]
        scores = scores.float().unsqueeze(1)
        return torch.sigmoid(scores) if self.activation == "sigmoid" else scores


def is_logit_score_checkpoint(source: Path) -> bool:
    modules_file = source / "modules.json"
    if not modules_file.is_file():
        return False
    return [module["type"].rsplit(".", 1)[-1] for module in json.loads(modules_file.read_text())] == ["Transformer", "LogitScore"]


def logit_score_head(source: Path, tokenizer: Any) -> LogitScoreHead:
    """The head a LogitScore checkpoint describes, or a ``ValueError``."""
    modules = json.loads((source / "modules.json").read_text())
    score = _json(source / modules[1]["path"] / "config.json")
    transformer = _json(source / modules[0].get("path", "") / "sentence_bert_config.json")
    settings = _json(source / "config_sentence_transformers.json")
    if transformer.get("transformer_task") != "text-generation":
        raise ValueError(f"{source}: its LogitScore reads a {transformer.get('transformer_task')!r} model's output, not a causal LM's")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{source}: a LogitScore reranker without a chat template (tokenstep renders pairs through the template)")
    message = (transformer.get("modality_config") or {}).get("message") or {}
    if message.get("format", "flat") != "flat":
        raise ValueError(f"{source}: its chat template takes {message.get('format')!r} messages; tokenstep renders flat ones")
    if score.get("module_input_name", "causal_logits") != "causal_logits":
        raise ValueError(f"{source}: its LogitScore reads {score['module_input_name']!r}, not the causal LM's logits")
    named = settings.get("activation_fn", "torch.nn.modules.activation.Sigmoid")
    if named not in ACTIVATIONS:
        raise ValueError(f"{source}: its scores go through {named}, which tokenstep does not apply")
    template_kwargs = dict((transformer.get("processing_kwargs") or {}).get("chat_template") or {})
    template_kwargs.pop("restore_suffix", None)  # only acts on truncated renders, which tokenstep refuses
    prompt = (settings.get("prompts") or {}).get(settings.get("default_prompt_name") or "") or None
    pair_messages = PairMessages(prompt, tuple(sorted(template_kwargs.items())))
    return LogitScoreHead(score["true_token_id"], score.get("false_token_id"), ACTIVATIONS[named], pair_messages)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}

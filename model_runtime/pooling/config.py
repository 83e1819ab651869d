"""How a pooling model turns hidden states into one vector (an embedder:
``PoolingConfig``) or a text pair into a score (a cross-encoder:
``ScoreHead``): read from the checkpoint, as sentence-transformers reads it,
or refused.

A sentence-transformers checkpoint says it in ``modules.json``: a
``Transformer`` (the Hugging Face model, in the module's folder, with
``sentence_bert_config.json`` capping its input), a ``Pooling`` (its
``config.json`` names the mode: CLS token, mean, max, mean / sqrt(length),
weighted mean or last token) and optionally ``Normalize`` (unit length).
Any other module (``Dense``, ``LayerNorm``, ...) would change the vector in
a way tokenstep does not compute, so such a checkpoint is refused at load,
never served with a different vector. Without ``modules.json`` a plain
encoder (BERT, RoBERTa, XLM-RoBERTa, ModernBERT, ...) pools its CLS token
and normalizes, as vLLM does for such checkpoints; any other model without
one is refused (nothing says how to pool it). A cross-encoder
(``*ForSequenceClassification`` with one label) scores through the
activation its config names for sentence-transformers, a sigmoid by default.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

logger = logging.getLogger(__name__)

MODES = {  # 1_Pooling/config.json's flag -> tokenstep's name of the mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weighted_mean",
    "pooling_mode_lasttoken": "last",
}
MODE_NAMES = {  # sentence-transformers 6's pooling_mode -> tokenstep's name
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weighted_mean",
    "lasttoken": "last",
}
# Encoders that pool their CLS token (and normalize) when no modules.json says otherwise.
PLAIN_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "modernbert", "distilbert", "electra", "mpnet", "deberta-v2", "camembert"})


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    """``mode``: one of ``MODES``' values; ``normalize``: to unit length
    after pooling; ``max_input_tokens``: the checkpoint's own cap on inputs, if any;
    ``source``: what said so, for the start log."""

    mode: str
    normalize: bool
    max_input_tokens: int | None = None
    source: str = "modules.json"
    task = "embed"
    pair_messages = None  # pairs are not rendered as chat messages

    def describe(self) -> str:
        return f"{self.mode} pooling{', normalized' if self.normalize else ''} ({self.source})"

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, L, H] and ``mask`` [B, L] (1 on each row's tokens,
        which come first: right padding) -> [B, H], as sentence-transformers
        pools."""
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        lengths = weights.sum(dim=1)  # [B, 1]
        if self.mode == "cls":
            return hidden[:, 0]
        if self.mode == "last":
            last = mask.sum(dim=1) - 1  # [B]
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if self.mode == "max":
            return hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
        if self.mode == "weighted_mean":
            weights = weights * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)[None, :, None]
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        summed = (hidden * weights).sum(dim=1)  # [B, H]
        if self.mode == "mean_sqrt_len":
            return summed / lengths.sqrt()
        return summed / lengths.clamp(min=1e-9)

    def finish(self, vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
        """Pooled ``vectors`` [B, H] cut to ``dimensions`` (a Matryoshka
        model), then normalized where the model normalizes."""
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        return F.normalize(vectors, p=2, dim=1) if self.normalize else vectors


ACTIVATIONS = {  # a cross-encoder's activation on its logit, as sentence-transformers names it
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.Identity": "identity",
}


@dataclass(frozen=True, slots=True)
class ScoreHead:
    """A cross-encoder's score of a text pair: the model's one logit
    (``*ForSequenceClassification`` with one label) through ``activation``
    (``sigmoid`` or ``identity``), as sentence-transformers' ``CrossEncoder``
    predicts it; ``source``: what said so, for the start log."""

    activation: str
    max_input_tokens: int | None = None
    source: str = "config.json"
    task = "score"
    pair_messages = None  # pairs are the tokenizer's text pairs

    def describe(self) -> str:
        return f"a cross-encoder's logit{' through a sigmoid' if self.activation == 'sigmoid' else ''} ({self.source})"

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, 1] -> scores [B, 1]."""
        return torch.sigmoid(logits) if self.activation == "sigmoid" else logits


def score_head(source: Path, config: Any) -> ScoreHead:
    """How a cross-encoder checkpoint scores, or a ``ValueError``: one label
    only, and an activation sentence-transformers would apply from torch."""
    if config.num_labels != 1:
        raise ValueError(f"{source} classifies into {config.num_labels} labels; tokenstep serves cross-encoders (rerankers) with one score")
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in PLAIN_ENCODERS:
        if config.get_text_config().pad_token_id is None:  # transformers finds each row's last token by it
            raise ValueError(f"{source}: a decoder classifier without a pad_token_id in its config cannot score a batch of pairs")
    named = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn") or getattr(
        config, "sbert_ce_default_activation_function", None
    )
    if named is None:
        return ScoreHead("sigmoid", source="one label: a sigmoid, as sentence-transformers' default")
    if named not in ACTIVATIONS:
        raise ValueError(f"{source}: its scores go through {named}, which tokenstep does not apply")
    return ScoreHead(ACTIVATIONS[named], source=f"config.json's {named}")


def module_kind(module: dict) -> str:
    """A sentence-transformers module's class name, whatever the version's module path."""
    return module["type"].rsplit(".", 1)[-1]


def pooling_modes(pooling: dict) -> list[str | None]:
    """The modes a Pooling config names, in tokenstep's names (None for one
    it does not know): sentence-transformers 6's ``pooling_mode`` (a name or
    a list), or the older ``pooling_mode_*`` flags."""
    if "pooling_mode" not in pooling:
        return [MODES[flag] for flag in MODES if pooling.get(flag)]
    named = pooling["pooling_mode"]
    return [MODE_NAMES.get(name) for name in ([named] if isinstance(named, str) else named)]


def pooling_config(source: Path, model_type: str, is_forced: bool = False) -> PoolingConfig:
    """The pooling ``source`` (a local checkpoint directory) asks for, or a
    ``ValueError`` naming what tokenstep cannot compute. ``is_forced``
    (``--task embed``): a model that is no plain encoder and has no
    ``modules.json`` pools its last token, normalized (vLLM's default for a
    decoder used as an embedder)."""
    modules_file = source / "modules.json"
    if not modules_file.is_file():
        if is_forced and model_type not in PLAIN_ENCODERS:
            return PoolingConfig("last", True, source="--task embed on a decoder: its last token, as vLLM's default")
        if model_type not in PLAIN_ENCODERS:
            raise ValueError(
                f"{source} has no modules.json saying how to pool its {model_type!r} model into one vector; tokenstep "
                "serves sentence-transformers checkpoints and plain encoders (BERT-like: CLS pooling)"
            )
        return PoolingConfig("cls", True, source="a plain encoder's default, as vLLM's")
    modules = json.loads(modules_file.read_text())
    kinds = [module_kind(module) for module in modules]  # sentence_transformers.models.Pooling, or 6.x's ...modules.pooling.Pooling
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        unknown = [module["type"] for module in modules if module_kind(module) not in ("Transformer", "Pooling")]
        raise ValueError(
            f"{source}: tokenstep serves sentence-transformers models made of Transformer, Pooling and optionally "
            f"Normalize, in that order; this one has {', '.join(unknown or kinds)}, whose output it does not compute"
        )
    model_dir = source / modules[0].get("path", "")
    pooling = json.loads((source / modules[1]["path"] / "config.json").read_text())
    modes = pooling_modes(pooling)
    if len(modes) != 1 or modes[0] is None:
        raise ValueError(f"{source}: its Pooling module combines {modes or 'no'} modes; tokenstep pools with exactly one")
    if pooling.get("include_prompt") is False:
        raise ValueError(f"{source}: its Pooling module leaves out the prompt (include_prompt false), which tokenstep does not do")
    settings_file = model_dir / "sentence_bert_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    if settings.get("transformer_task", "feature-extraction") != "feature-extraction":
        raise ValueError(f"{source}: its Transformer module runs {settings['transformer_task']!r}, not the hidden states it pools")
    if settings.get("do_lower_case"):
        raise ValueError(f"{source}: its Transformer module lowercases the input (do_lower_case), which tokenstep does not do")
    return PoolingConfig(modes[0], len(modules) == 3, settings.get("max_seq_length"))

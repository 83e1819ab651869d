"""Load a pooling model: the Hugging Face model inside a sentence-transformers
checkpoint (or a bare encoder), its tokenizer, and how it pools; or a
cross-encoder (``*ForSequenceClassification``) and how it scores.

An embedder loads through ``AutoModel`` (a cross-encoder through
``AutoModelForSequenceClassification``): its own forward, no paged
attention (an encoder attends both ways over its whole input at once, so it
keeps no KV cache between steps; ``model_runtime.pooling.runner`` runs each
step's inputs as one padded batch).
"""

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from model_runtime.pooling.config import PoolingConfig, ScoreHead, pooling_config, score_head
from model_runtime.pooling.logit_score import LogitScoreHead, is_logit_score_checkpoint, logit_score_head

logger = logging.getLogger(__name__)

HUGE_MAX_LENGTH = 1_000_000  # a tokenizer's "no limit" (model_max_length ~1e30) is ignored
# RoBERTa-family position ids start after the padding id: max_position_embeddings - (pad_token_id + 1) are usable.
OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"})


@dataclass(frozen=True, slots=True)
class PoolingModelParts:
    model: PreTrainedModel
    tokenizer: Any
    pooling: PoolingConfig | ScoreHead | LogitScoreHead
    max_model_len: int
    num_dimensions: int
    is_matryoshka: bool  # trained so that a prefix of a vector is an embedding (config.json says, as vLLM reads it)


def is_pooling_checkpoint(source: Path) -> bool:
    """A local checkpoint to serve as a pooling model: a sentence-transformers
    one (``modules.json``), a bare model with no head (``BertModel``), or a
    cross-encoder (``BertForSequenceClassification``)."""
    if (source / "modules.json").is_file():
        return True
    config_file = source / "config.json"
    if not config_file.is_file():
        return False
    architectures = json.loads(config_file.read_text()).get("architectures") or [""]
    name = architectures[0]
    return name in _base_model_classes() or name.endswith("ForSequenceClassification")


@functools.cache
def _base_model_classes() -> frozenset[str]:
    """transformers' bare-model class names (``BertModel``, ``XLMRobertaModel``:
    no head), not those ending in "Model" that carry one (``MarianMTModel``)."""
    names = [name for value in MODEL_MAPPING_NAMES.values() for name in ((value,) if isinstance(value, str) else value)]
    return frozenset(names)


def load_pooling_model(source: Path, device: torch.device, dtype: torch.dtype, task: str = "auto") -> PoolingModelParts:
    """``task``: ``score`` (a cross-encoder), ``embed``, or ``auto`` (a
    ``*ForSequenceClassification`` checkpoint scores, any other embeds)."""
    model_dir = _transformer_dir(source)
    config = AutoConfig.from_pretrained(model_dir)
    is_classifier = (config.architectures or [""])[0].endswith("ForSequenceClassification")
    if task in ("score", "auto") and is_logit_score_checkpoint(source):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        head = logit_score_head(source, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
        return PoolingModelParts(model, tokenizer, head, _max_model_len(config, tokenizer, head), 1, False)
    if task == "score" and not is_classifier:
        raise ValueError(f"--task score: {source} is no cross-encoder (a *ForSequenceClassification checkpoint with one label)")
    if task == "score" or (task == "auto" and is_classifier):
        pooling: PoolingConfig | ScoreHead = score_head(source, config)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config, dtype=dtype)
    else:
        pooling = pooling_config(source, config.model_type, is_forced=task == "embed")
        model = AutoModel.from_pretrained(model_dir, config=config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _warn_of_default_prompt(source)
    model.to(device).eval()
    is_matryoshka = bool(getattr(config, "is_matryoshka", False) or getattr(config, "matryoshka_dimensions", None))
    num_dimensions = config.num_labels if pooling.task == "score" else config.hidden_size
    return PoolingModelParts(model, tokenizer, pooling, _max_model_len(config, tokenizer, pooling), num_dimensions, is_matryoshka)


def _warn_of_default_prompt(source: Path) -> None:
    """sentence-transformers prepends a checkpoint's default prompt ("query: ")
    to every input it encodes; a server embeds what it is sent (as vLLM
    does), so the start log says to send it."""
    settings_file = source / "config_sentence_transformers.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    prompt = (settings.get("prompts") or {}).get(settings.get("default_prompt_name") or "")
    if prompt:
        logger.warning("%s: its default prompt %r is not prepended to inputs: send it with them", source, prompt)


def _transformer_dir(source: Path) -> Path:
    """The folder of a sentence-transformers checkpoint's Transformer module
    (its root, or ``0_Transformer`` in older ones); the checkpoint itself otherwise."""
    modules_file = source / "modules.json"
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text()):
            if module["type"].endswith(".Transformer"):
                return source / module.get("path", "")
    return source


def _max_model_len(config: Any, tokenizer: Any, pooling: PoolingConfig | ScoreHead | LogitScoreHead) -> int:
    """The longest input: the model's positions, the tokenizer's and the
    checkpoint's own caps, whichever is smallest."""
    positions = getattr(config, "max_position_embeddings", None) or 512
    if config.model_type in OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    caps = [positions, pooling.max_input_tokens, tokenizer.model_max_length]
    return min(cap for cap in caps if cap is not None and cap < HUGE_MAX_LENGTH)

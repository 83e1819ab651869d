"""Tiny random-weight models for tests, saved with the default model's tokenizer.

Weights use a wide initializer so next-token logits are well separated: greedy
parity then compares real decisions, not float noise between near-ties.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB_SIZE = 49152


def _save(model: torch.nn.Module, target: Path, tokenizer_dir: Path) -> Path:
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return target


def build_tiny_llama(target: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    return _save(LlamaForCausalLM(config).eval(), target, tokenizer_dir)


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

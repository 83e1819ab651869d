"""A tiny random Llama written as a GGUF file, as llama.cpp's converter writes one.

Its linears are quantized with gguf's own reference quantizers, one block type
per projection so every type ``--quantization gguf`` serves is in one file
(Q4_0, Q4_1, Q8_0, and F16 for one that stays float); q and k are stored with
llama.cpp's row permutation; the LM head is tied to a Q8_0 embedding. The
tokenizer is a small byte-level BPE (256 byte symbols, a few merges, an end
token), so transformers reads the whole file in well under a second.
"""

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

EOS = "<|endoftext|>"
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "o n", "Ġ a", "r e", "a t"]
# GGUF type per projection of each block (and the embedding).
TYPES = {
    "attn_q": "Q4_1",
    "attn_k": "Q4_0",
    "attn_v": "Q8_0",
    "attn_output": "Q4_1",
    "ffn_gate": "Q4_0",
    "ffn_up": "Q4_1",
    "ffn_down": "F16",
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def tokens() -> list[str]:
    symbols = list(bytes_to_unicode().values())
    return symbols + [a + b for a, b in (merge.split(" ") for merge in MERGES)] + [EOS]


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order (transformers undoes it on load)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def build_tiny_llama_gguf(target: Path) -> Path:
    """Write the file at ``target`` and return it."""
    import gguf

    torch.manual_seed(0)
    vocab = tokens()
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    state = {name: value.float().numpy() for name, value in LlamaForCausalLM(config).state_dict().items()}
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else 10000.0)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(vocab) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(vocab) - 1)
    writer.add_eos_token_id(len(vocab) - 1)

    def add(name: str, weight: np.ndarray, type_name: str) -> None:
        qtype = gguf.GGMLQuantizationType[type_name]
        data = weight.astype(np.float16) if type_name == "F16" else weight if type_name == "F32" else gguf.quants.quantize(weight, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)

    add("token_embd.weight", state["model.embed_tokens.weight"], "Q8_0")
    add("output_norm.weight", state["model.norm.weight"], "F32")
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        add(f"blk.{layer}.attn_norm.weight", state[prefix + "input_layernorm.weight"], "F32")
        add(f"blk.{layer}.ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"], "F32")
        for gguf_name, hf_name in HF_NAMES.items():
            weight = state[f"{prefix}{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = permute(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = permute(weight, config.num_key_value_heads)
            add(f"blk.{layer}.{gguf_name}.weight", weight, TYPES[gguf_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target

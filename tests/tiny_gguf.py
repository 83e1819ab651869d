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
# GGUF type per projection of each block (the embedding is EMBEDDING_TYPE).
TYPES = {
    "attn_q": "Q4_1",
    "attn_k": "Q4_0",
    "attn_v": "Q8_0",
    "attn_output": "Q4_1",
    "ffn_gate": "Q4_0",
    "ffn_up": "Q4_1",
    "ffn_down": "F16",
}
EMBEDDING_TYPE = "Q8_0"
# The K-quants and 5-bit types, in a file whose rows are super-blocks long (256).
K_TYPES = {
    "attn_q": "Q4_K",
    "attn_k": "Q5_K",
    "attn_v": "Q5_0",
    "attn_output": "Q5_1",
    "ffn_gate": "Q4_K",
    "ffn_up": "Q5_K",
    "ffn_down": "Q6_K",
}
K_EMBEDDING_TYPE = "Q4_K"
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


def quantize_k(weight: np.ndarray, type_name: str) -> np.ndarray:
    """float32 [N, K] (K a multiple of 256) as Q4_K or Q5_K blocks, uint8
    [N, K / 256 * bytes] (gguf has no quantizer for them): each group of 32
    gets the scale (max - min) / levels and minimum -min (min at most 0), coded
    in 6 bits against its super-block's float16 d and dmin; each weight is then
    rounded against the coded scale and minimum. Checked against gguf's own
    dequantization in tests/model_runtime/test_gguf.py."""
    levels = 15 if type_name == "Q4_K" else 31
    n, k = weight.shape
    groups = weight.astype(np.float32).reshape(n, k // 256, 8, 32)
    low, high = np.minimum(groups.min(-1), 0), groups.max(-1)

    def code(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float16 super-block factor, 6-bit codes) with factor * code close to values."""
        factor = (values.max(-1) / 63).astype(np.float16)
        safe = np.where(factor > 0, factor.astype(np.float32), 1)[..., None]
        return factor, np.clip(np.round(values / safe), 0, 63).astype(np.uint8)

    d, scales = code((high - low) / levels)
    dmin, minimums = code(-low)
    step = d.astype(np.float32)[..., None] * scales
    q = np.round((groups + (dmin.astype(np.float32)[..., None] * minimums)[..., None]) / np.where(step > 0, step, 1)[..., None])
    q = np.clip(q, 0, levels).astype(np.uint8)
    packed_scales = np.concatenate(
        (
            scales[..., :4] | ((scales[..., 4:] >> 4) << 6),
            minimums[..., :4] | ((minimums[..., 4:] >> 4) << 6),
            (scales[..., 4:] & 15) | ((minimums[..., 4:] & 15) << 4),
        ),
        axis=-1,
    )
    pairs = q.reshape(n, k // 256, 4, 2, 32)
    nibbles = ((pairs[:, :, :, 0] & 15) | ((pairs[:, :, :, 1] & 15) << 4)).reshape(n, k // 256, 128)
    parts = [d.view(np.uint8).reshape(n, -1, 2), dmin.view(np.uint8).reshape(n, -1, 2), packed_scales]
    if type_name == "Q5_K":
        parts.append(((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2, dtype=np.uint8))
    return np.concatenate([*parts, nibbles], axis=-1).reshape(n, -1)


def quantize_q6_k(weight: np.ndarray) -> np.ndarray:
    """float32 [N, K] (K a multiple of 256) as Q6_K blocks, uint8 [N, K / 256 *
    210]: each 16 weights get a signed int8 scale against the super-block's
    float16 d, each weight a 6-bit code (value = d * scale * (code - 32))."""
    n, k = weight.shape
    count = k // 256
    groups = weight.astype(np.float32).reshape(n, count, 16, 16)
    wanted = groups.max(-1, initial=0) / 31  # a positive step: codes 32..63 reach the largest
    wanted = np.where(np.abs(groups.min(-1)) / 32 > wanted, groups.min(-1) / -32, wanted)
    d = (np.abs(wanted).max(-1) / 127).astype(np.float16)
    scales = np.clip(np.round(wanted / np.where(d > 0, d.astype(np.float32), 1)[..., None]), -128, 127).astype(np.int8)
    step = d.astype(np.float32)[..., None] * scales
    q = np.clip(np.round(groups / np.where(step != 0, step, 1)[..., None]) + 32, 0, 63).astype(np.uint8).reshape(n, count, 2, 128)
    low = (q[..., :64] & 15) | ((q[..., 64:] & 15) << 4)  # [n, count, 2, 64]
    high = ((q.reshape(n, count, 2, 4, 32) >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=3, dtype=np.uint8)
    parts = [low.reshape(n, count, 128), high.reshape(n, count, 64), scales.view(np.uint8), d.view(np.uint8).reshape(n, count, 2)]
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def build_tiny_llama_gguf(target: Path, types: dict[str, str] = TYPES, embedding_type: str = EMBEDDING_TYPE, width: int = 64) -> Path:
    """Write the file at ``target`` and return it: hidden size ``width``
    (256 for the K-quants' super-blocks), MLP twice that."""
    import gguf

    torch.manual_seed(0)
    vocab = tokens()
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
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
        if type_name in ("Q4_K", "Q5_K"):
            data = quantize_k(weight, type_name)
        elif type_name == "Q6_K":
            data = quantize_q6_k(weight)
        elif type_name in ("F16", "F32"):
            data = weight.astype(np.float16 if type_name == "F16" else np.float32)
        else:
            data = gguf.quants.quantize(weight, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)

    add("token_embd.weight", state["model.embed_tokens.weight"], embedding_type)
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
            add(f"blk.{layer}.{gguf_name}.weight", weight, types[gguf_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target

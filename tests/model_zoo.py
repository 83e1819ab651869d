"""Tiny random-weight models of the architectures people serve, built
offline from transformers' own config classes (no download), for the
model-zoo parity matrix (``tests/model_runtime/test_model_zoo.py``).

Every model shares one shape where its config allows it: 2 layers (4 where
a layer pattern needs them), hidden 64, 4 query heads of 16 over 2 KV heads,
the default model's 49,152-token vocabulary, and a sliding window of
``WINDOW`` tokens where the architecture has one, so prompts of a few
hundred tokens run well past it. Weights are drawn wide
(``initializer_range`` 0.2) so greedy decisions are well separated.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import TINY_DECODER

WINDOW = 24  # sliding window of the sliding architectures, in tokens
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_GEMMA4 = dict(
    sliding_window=WINDOW,
    per_layer_config={"01": {"head_dim": 32}},
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=TINY_DECODER["vocab_size"],
)


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the matrix: its ``model_type`` and what its config
    sets beyond (or instead of) the common shape."""

    model_type: str
    overrides: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()  # common keys the config class does not take
    # What the matrix proves: "served" (greedy parity) or the words of the load refusal.
    refused: str | None = None

    def config(self) -> object:
        settings = {k: v for k, v in TINY_DECODER.items() if k not in self.drop} | self.overrides
        return AutoConfig.for_model(self.model_type, **settings)


ZOO: dict[str, ZooModel] = {
    "llama": ZooModel("llama"),
    # A head size the C++ decode kernel does not take (a multiple of 16): the Python paths in float32.
    "llama-head-24": ZooModel("llama", dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=24)),
    "qwen2": ZooModel("qwen2"),
    "qwen2-sliding": ZooModel("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    "qwen3": ZooModel("qwen3"),
    "mistral-sliding": ZooModel("mistral", dict(sliding_window=WINDOW)),
    "gemma2": ZooModel(
        "gemma2", dict(sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=30.0)
    ),
    "gemma3": ZooModel(
        "gemma3_text", dict(sliding_window=WINDOW, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])
    ),
    # Gemma 4: full layers with heads of their own size (32, the sliding ones 16), per-layer inputs.
    "gemma4": ZooModel("gemma4_text", dict(_GEMMA4, layer_types=["sliding_attention", "full_attention"])),
    # ... and its smaller variants' KV sharing: the last two layers reuse the keys and values of the first two.
    "gemma4-kv-shared": ZooModel(
        "gemma4_text",
        dict(
            _GEMMA4,
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            num_kv_shared_layers=2,
            per_layer_config={"01": {"head_dim": 32}, "03": {"head_dim": 32}},
        ),
    ),
    "phi3": ZooModel("phi3"),
    "olmo2": ZooModel("olmo2"),
    "granite": ZooModel("granite"),
    "starcoder2": ZooModel("starcoder2", dict(sliding_window=WINDOW)),
    "mixtral": ZooModel("mixtral", _MOE),
    "qwen3-moe": ZooModel("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)),
    "gpt-oss": ZooModel("gpt_oss", dict(_MOE, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    # Its config keeps a stray num_key_value_heads=2 that the model ignores (it has 4 KV heads):
    # the cache is shaped by what the layers hand attention, not by the config.
    "gpt-neox": ZooModel("gpt_neox", drop=("head_dim",)),
    # Falcon's decoder layers drop the forward's kwargs: the step reaches attention through a slot.
    "falcon": ZooModel(
        "falcon", dict(new_decoder_architecture=True, num_kv_heads=2), drop=("num_key_value_heads", "head_dim", "intermediate_size")
    ),
    "falcon-alibi": ZooModel(
        "falcon",
        dict(alibi=True, new_decoder_architecture=False, multi_query=False),
        drop=("num_key_value_heads", "head_dim", "intermediate_size"),
        refused="ALiBi position biases",
    ),
    "stablelm": ZooModel("stablelm"),
    "phi": ZooModel("phi", drop=("head_dim",)),
    "gpt2": ZooModel(
        "gpt2",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
        drop=tuple(k for k in TINY_DECODER if k not in ("vocab_size", "bos_token_id", "eos_token_id", "initializer_range")),
    ),
    "cohere": ZooModel("cohere"),
    "cohere2": ZooModel("cohere2", dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "deepseek-v3": ZooModel(
        "deepseek_v3",
        dict(
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        drop=("head_dim",),
    ),
    "llama4": ZooModel(
        "llama4_text",
        dict(
            attention_chunk_size=WINDOW,
            num_local_experts=2,
            intermediate_size_mlp=128,
            no_rope_layer_interval=2,
            interleave_moe_layer_step=1,
        ),
        refused="chunked attention",
    ),
}


def build(name: str, target: Path, tokenizer_dir: Path) -> Path:
    """Build zoo model ``name`` into ``target`` with the default model's tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ZOO[name].config()).eval()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return target

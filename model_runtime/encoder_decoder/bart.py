"""The BART family's decoder step (BART, mBART, Marian) over a flat ragged
batch, from the model's own modules.

The families differ only in where things sit: learned positions with an
offset of 2 (BART, mBART) or sinusoidal ones (Marian), both looked up by
each row's own position (the model's forward would use ``arange(T)``); token
embeddings scaled inside the module (BART, mBART) or by the decoder
(Marian's ``embed_scale``); layer norm after each residual block (BART,
Marian) or before it with a final norm (mBART); a norm on the embeddings
(BART, mBART). Self-attention runs through tokenstep's paged attention
(``attention.attend``: the C++ decode kernel where it runs), cross-attention
reads each row's cross blocks.
"""

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from model_runtime.attention.context import StepContext
from model_runtime.attention.interface import LayerFeatures, attend
from model_runtime.encoder_decoder.cross_attention import CrossContext, cross_attend

# Layer norm before each residual block (and once more at the end).
NORM_BEFORE = {"bart": False, "mbart": True, "marian": False}


class BartDecoderStep:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        config = model.config
        self.num_heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.num_heads
        self.norm_before = NORM_BEFORE[config.model_type]
        self.sinusoidal = config.model_type == "marian"
        self.embed_scale = getattr(self.decoder, "embed_scale", 1.0)  # Marian's; BART's embedding scales itself
        self.final_logits_bias = getattr(model, "final_logits_bias", None)

    def cross_key_value(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s cross-attention K and V of the encoder output ``[S, d_model]``, each ``[heads, S, head_dim]``."""
        attention = self.decoder.layers[layer].encoder_attn
        return self._heads(attention.k_proj(hidden)), self._heads(attention.v_proj(hidden))

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """``[..., T, heads * head_dim]`` -> ``[..., heads, T, head_dim]``."""
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, context: StepContext, cross: CrossContext) -> torch.Tensor:
        """The decoder's last hidden states ``[T, d_model]``."""
        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids) * self.embed_scale  # [1, T, d_model]
        if self.sinusoidal:
            positions = decoder.embed_positions(input_ids.shape, 0, position_ids=position_ids)
        else:  # BART's learned positions take [T] (and add a batch dimension themselves)
            positions = decoder.embed_positions(input_ids, 0, position_ids=position_ids[0])
        hidden = hidden + positions
        if (embedding_norm := getattr(decoder, "layernorm_embedding", None)) is not None:
            hidden = embedding_norm(hidden)
        for index, layer in enumerate(decoder.layers):
            key_cache, value_cache = context.key_caches[index], context.value_caches[index]

            def self_attention(x: torch.Tensor, attention=layer.self_attn, key_cache=key_cache, value_cache=value_cache) -> torch.Tensor:
                query, key, value = (self._heads(projection(x)) for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
                return attention.out_proj(
                    attend(query, key, value, key_cache, value_cache, context, LayerFeatures(attention.scaling)).flatten(-2)
                )

            def cross_attention(
                x: torch.Tensor, attention=layer.encoder_attn, key_cache=key_cache, value_cache=value_cache
            ) -> torch.Tensor:
                query = self._heads(attention.q_proj(x))
                return attention.out_proj(cross_attend(query, key_cache, value_cache, context, cross, attention.scaling).flatten(-2))

            def feed_forward(x: torch.Tensor, layer=layer) -> torch.Tensor:
                return layer.fc2(layer.activation_fn(layer.fc1(x)))

            hidden = self._residual(hidden, layer.self_attn_layer_norm, self_attention)
            hidden = self._residual(hidden, layer.encoder_attn_layer_norm, cross_attention)
            hidden = self._residual(hidden, layer.final_layer_norm, feed_forward)
        if (final_norm := getattr(decoder, "layer_norm", None)) is not None:
            hidden = final_norm(hidden)
        return hidden[0]

    def _residual(self, hidden: torch.Tensor, norm: torch.nn.Module, block: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.norm_before:
            return hidden + block(norm(hidden))
        return norm(hidden + block(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden)
        return logits + self.final_logits_bias[0] if self.final_logits_bias is not None else logits

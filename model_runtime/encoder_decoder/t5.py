"""The T5 family's decoder step (T5, T5 v1.1 / Flan-T5, mT5) over a flat
ragged batch, from the model's own modules.

T5 has no position embeddings: each self-attention score gets a learned bias
by the bucketed distance between the query's and the key's positions (the
first decoder layer's table, shared by all layers), and scores are not
scaled. The model's forward computes that bias for one offset for the whole
batch; here it is computed once per step for every row at its own position
(``StepBias``), with ``T5Attention``'s own bucketing. Cross-attention has no
bias. Feed-forward blocks (ReLU or gated GELU) are the model's modules,
norm and residual included.
"""

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.t5.modeling_t5 import T5Attention

from model_runtime.attention.context import StepContext
from model_runtime.attention.interface import gather_blocks, write_cache
from model_runtime.encoder_decoder.cross_attention import CrossContext, cross_attend


class StepBias:
    """The self-attention bias of one step, ``-inf`` where a key is in a
    row's future (or padding): ``[B, heads, 1, L]`` for the decode rows and
    ``[1, heads, n, ctx]`` per prefill span."""

    def __init__(self, table: torch.nn.Embedding, num_buckets: int, max_distance: int, context: StepContext) -> None:
        self.table, self.num_buckets, self.max_distance = table, num_buckets, max_distance
        self.decode = None
        if context.num_decode_tokens:
            query_positions = context.decode_context_lens - 1  # [B]
            key_positions = torch.arange(context.decode_block_tables.shape[1] * _block_size(context), device=query_positions.device)
            self.decode = self._bias(query_positions[:, None], key_positions[None, :]).unsqueeze(2)  # [B, heads, 1, L]
        self.prefills = []
        for span in context.prefills:
            key_positions = torch.arange(span.num_computed_tokens + span.num_new_tokens, device=span.block_ids.device)
            query_positions = key_positions[span.num_computed_tokens :]
            self.prefills.append(
                self._bias(query_positions[:, None], key_positions[None, :]).transpose(0, 1).unsqueeze(0)
            )  # [1, heads, n, ctx]

    def _bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """``[X, heads, Y]`` for query positions ``[X, 1]`` and key positions ``[1, Y]``."""
        relative = key_positions - query_positions  # [X, Y]
        buckets = T5Attention._relative_position_bucket(
            relative, bidirectional=False, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        bias = self.table(buckets).movedim(-1, 1)  # [X, heads, Y]
        return bias.masked_fill(relative[:, None, :] > 0, float("-inf"))


def _block_size(context: StepContext) -> int:
    return context.key_caches[0].shape[1]


class T5DecoderStep:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        config = model.config
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        self.bias_table = self.decoder.block[0].layer[0].SelfAttention.relative_attention_bias
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.output_scale = model.model_dim**-0.5 if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings) else None

    def cross_key_value(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s cross-attention K and V of the encoder output ``[S, d_model]``, each ``[heads, S, head_dim]``."""
        attention = self.decoder.block[layer].layer[1].EncDecAttention
        return self._heads(attention.k(hidden)), self._heads(attention.v(hidden))

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """``[..., T, heads * head_dim]`` -> ``[..., heads, T, head_dim]``."""
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, context: StepContext, cross: CrossContext) -> torch.Tensor:
        """The decoder's last hidden states ``[T, d_model]``."""
        bias = StepBias(self.bias_table, self.num_buckets, self.max_distance, context)
        hidden = self.decoder.embed_tokens(input_ids)  # [1, T, d_model]
        for index, block in enumerate(self.decoder.block):
            self_layer, cross_layer, feed_forward = block.layer[0], block.layer[1], block.layer[-1]
            hidden = hidden + self._self_attention(self_layer.SelfAttention, self_layer.layer_norm(hidden), index, context, bias)
            attention = cross_layer.EncDecAttention
            query = self._heads(attention.q(cross_layer.layer_norm(hidden)))  # [1, heads, T, head_dim]
            attended = cross_attend(query, context.key_caches[index], context.value_caches[index], context, cross, 1.0)
            hidden = hidden + attention.o(attended.flatten(-2))
            hidden = feed_forward(hidden)
        return self.decoder.final_layer_norm(hidden)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return self.model.lm_head(hidden)

    def _self_attention(
        self, attention: T5Attention, hidden: torch.Tensor, layer: int, context: StepContext, bias: StepBias
    ) -> torch.Tensor:
        """Causal self-attention with the step's position bias; ``[1, T, d_model]``."""
        query, key, value = (
            self._heads(projection(hidden)) for projection in (attention.q, attention.k, attention.v)
        )  # [1, heads, T, head_dim]
        key_cache, value_cache = context.key_caches[layer], context.value_caches[layer]
        write_cache(key_cache, value_cache, key[0], value[0], context.slot_mapping)
        num_tokens = query.shape[2]
        output = query.new_empty(num_tokens, self.num_heads, self.head_dim)
        num_decode = context.num_decode_tokens
        if num_decode:
            keys = gather_blocks(key_cache, context.decode_block_tables)  # [B, heads, L, head_dim]
            values = gather_blocks(value_cache, context.decode_block_tables)
            decode_query = query[0, :, :num_decode].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
            output[:num_decode] = F.scaled_dot_product_attention(decode_query, keys, values, attn_mask=bias.decode, scale=1.0).squeeze(2)
        for span, span_bias in zip(context.prefills, bias.prefills):
            rows = slice(span.start, span.start + span.num_new_tokens)
            context_len = span.num_computed_tokens + span.num_new_tokens
            keys = gather_blocks(key_cache, span.block_ids)[:, :context_len].unsqueeze(0)  # [1, heads, ctx, head_dim]
            values = gather_blocks(value_cache, span.block_ids)[:, :context_len].unsqueeze(0)
            out = F.scaled_dot_product_attention(query[:, :, rows], keys, values, attn_mask=span_bias, scale=1.0)  # [1, heads, n, head_dim]
            output[rows] = out[0].transpose(0, 1)
        return attention.o(output.flatten(-2).unsqueeze(0))

"""Encoder-decoder models (T5 and BART families): encode once, cross-attend
from the cache, decode in the continuous batch.

When a request is admitted its source goes through the model's own encoder
in one pass; the cross-attention K/V of every decoder layer are computed from
the encoder output at once and written into the request's cross blocks (a
second, read-only block table, from the same pool as the decoder's
self-attention blocks: a decoder layer's pool holds both kinds), and the
encoder output is dropped. Each step then runs the decoder over the flat
ragged batch ``[1, T]`` like a decoder-only model: causal self-attention over
the paged cache, plus cross-attention reading each row's cross blocks.

The decoders' own forwards cannot take a flat batch: BART's computes its
positions as ``arange(T)`` and T5's its relative position bias from one
offset for the whole batch. So each family's step forward lives in a file of
its own (``t5``, ``bart``; both read the source through
``cross_attention``), built from the model's own modules
(embeddings, norms, projections, feed-forward blocks); greedy parity with
``model.generate`` proves them.
"""

import logging

import torch
from transformers import PreTrainedModel

from batching.messages import ScheduledChunk
from batching.runner_state import RunnerRequest
from model_runtime.attention.context import StepContext
from model_runtime.attention.interface import write_cache
from model_runtime.encoder_decoder.bart import BartDecoderStep
from model_runtime.encoder_decoder.cross_attention import CrossContext, cross_context
from model_runtime.encoder_decoder.t5 import T5DecoderStep
from model_runtime.kv_cache import CacheShape, PagedKVCache
from model_runtime.loading.loader import LoadedModel

logger = logging.getLogger(__name__)


class EncoderDecoderStep:
    """The runner's view of an encoder-decoder model (the other kind beside
    ``decoder_only.DecoderOnlyStep``, with the same members): its cache
    shape, and a step forward that first encodes the sources of newly
    admitted requests into their cross blocks, then runs the family's
    decoder step over the flat batch, cross-attending from each row's
    blocks. Never compiled (``compiled`` is None)."""

    compiled = None
    eager_reason: str | None = None  # why steps run eagerly although --compile asked otherwise

    def __init__(self, loaded: LoadedModel, kv_cache: PagedKVCache, decode_kernel: bool, compile_max_tokens: int | None) -> None:
        model = loaded.model
        if compile_max_tokens:
            self.eager_reason = "the step forward of encoder-decoder models is not compiled"
            logger.warning("--compile: %s; running it eagerly", self.eager_reason)
        self.model = model
        self.kv_cache = kv_cache
        self.with_mask = not decode_kernel  # the cross-attention's decode rows run in the C++ kernel, or through SDPA
        self.decoder = T5DecoderStep(model) if loaded.family == "t5" else BartDecoderStep(model)
        self.encoder = model.get_encoder()
        forced_eos = getattr(model.generation_config, "forced_eos_token_id", None)
        forced_eos = forced_eos[0] if isinstance(forced_eos, (list, tuple)) else forced_eos
        # The generation config's forced EOS (BART's): the last token a
        # request may produce is EOS, as model.generate makes it.
        self.forced_eos_bitmask = only_token_bitmask(forced_eos) if forced_eos is not None else None

    @staticmethod
    def cache_shape(loaded: LoadedModel) -> CacheShape:
        """What one cached token costs in the pool: the decoder's layers and
        heads (self and cross blocks alike)."""
        config = loaded.model.config
        if loaded.family == "t5":
            return CacheShape.uniform(config.num_decoder_layers, config.num_heads, config.d_kv, loaded.dtype)
        head_dim = config.d_model // config.decoder_attention_heads
        return CacheShape.uniform(config.decoder_layers, config.decoder_attention_heads, head_dim, loaded.dtype)

    def encode(self, source_token_ids: list[int], cross_block_ids: list[int]) -> None:
        """Run the encoder over one source and write every decoder layer's
        cross-attention K/V into its cross blocks."""
        key_caches, value_caches = self.kv_cache.key_caches, self.kv_cache.value_caches
        device = key_caches[0].device
        block_size = key_caches[0].shape[1]
        input_ids = torch.tensor([source_token_ids], dtype=torch.long, device=device)
        hidden = self.encoder(input_ids=input_ids).last_hidden_state[0]  # [S, d_model]
        positions = torch.arange(len(source_token_ids), device=device)
        slots = (
            torch.tensor(cross_block_ids, dtype=torch.long, device=device)[positions // block_size] * block_size + positions % block_size
        )
        for layer, (key_cache, value_cache) in enumerate(zip(key_caches, value_caches)):
            key, value = self.decoder.cross_key_value(layer, hidden)  # [heads, S, head_dim]
            write_cache(key_cache, value_cache, key, value, slots)

    def forward(
        self,
        scheduled: list[tuple[ScheduledChunk, RunnerRequest]],
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        context: StepContext,
        logits_rows: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Logits ``[R, vocab]`` at ``logits_rows`` of the step (None without
        rows); ``scheduled`` in the order the step's rows are laid out
        (decode rows first)."""
        for chunk, request in scheduled:
            if chunk.new_request is not None:  # admitted or resumed in this step
                self.encode(request.encoder_token_ids, request.cross_block_ids)
        cross = self._cross_context(scheduled, context.slot_mapping.device)
        hidden = self.decoder.hidden_states(input_ids, position_ids, context, cross)  # [T, d_model]
        if logits_rows is None:
            return None
        return self.decoder.logits(hidden[logits_rows])

    def _cross_context(self, scheduled: list[tuple[ScheduledChunk, RunnerRequest]], device: torch.device) -> CrossContext:
        """Each row's cross blocks, decode rows first, as the step lays them out."""
        decode = [request for chunk, request in scheduled if chunk.num_new_tokens == 1]
        prefill = [request for chunk, request in scheduled if chunk.num_new_tokens != 1]
        return cross_context(
            [request.cross_block_ids for request in decode],
            [len(request.encoder_token_ids) for request in decode],
            [request.cross_block_ids for request in prefill],
            [len(request.encoder_token_ids) for request in prefill],
            self.kv_cache.block_size,
            device,
            self.with_mask,
        )


def only_token_bitmask(token_id: int) -> bytes:
    """A sampler bitmask (``ScheduledChunk.grammar_bitmask``'s layout) allowing ``token_id`` only."""
    mask = bytearray(4 * (token_id // 32 + 1))
    bit = token_id % 32
    mask[4 * (token_id // 32) + bit // 8] = 1 << (bit % 8)
    return bytes(mask)


def decoder_prompt_token_ids(model: PreTrainedModel) -> tuple[int, ...]:
    """The decoder's prompt as ``model.generate`` starts it: the decoder start
    token, then the token the generation config forces first (mBART's
    target language, BART's BOS), if any."""
    generation, config = model.generation_config, model.config
    start = getattr(generation, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = config.pad_token_id  # T5's convention
    start = start[0] if isinstance(start, (list, tuple)) else start
    if start is None:
        raise ValueError("the model's config names no decoder_start_token_id (nor a pad token to start from)")
    forced_bos = getattr(generation, "forced_bos_token_id", None)
    prompt = (start,) if forced_bos is None else (start, forced_bos)
    return prompt

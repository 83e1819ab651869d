"""Paged attention, plugged into transformers' ``AttentionInterface``.

The model's own forward runs over one flattened ragged batch ``[1, T]``. For
each layer, transformers hands us the step's new ``query``/``key``/``value``
(positions already applied); we write the new K/V into the paged cache by slot
index, then each sequence attends over its own blocks. Which code does it:

* where tokenstep's kernels run (float32 caches on the CPU, head sizes the
  decode kernel takes: ``decode_kernel_runs``), the whole layer is one C++
  op, ``tokenstep::paged_attention_step``, reading the step's metadata packed
  into one tensor (``attention.metadata``): it writes the cache, runs the
  decode rows in ``paged_decode_attention`` straight from their blocks, and
  each prefill chunk through SDPA (or plain math where the layer soft-caps
  or has sinks);
* otherwise ``attend`` does the same in Python: decode rows batched over
  their gathered blocks (a padded ``[B, L]`` context with a length mask, one
  SDPA call), each prefill chunk one SDPA call, causal over its new tokens
  and fully visible over the cached prefix;
* on CUDA (where Triton is installed), each layer is two Triton kernels
  (``attention.triton_paged``): the cache write, then one launch for every
  row of the step, decode and prefill alike;
* under ``--compile`` the graph calls one opaque op per layer
  (``model_runtime.step_graph``): the C++ step op, or a registered op that
  ends in ``attend``.

Each layer's own features come from the kwargs transformers hands the
attention function (``LayerFeatures``): a sliding window (a query at
position p sees keys at positions p - window < k <= p, as transformers'
masks and flash attention do), logit soft-capping (Gemma 2) and attention
sinks (gpt-oss's ``s_aux``). Every path honours them: the C++ kernels take
them as arguments; in Python, soft-capping and sinks, which SDPA cannot
express, run as plain math (``_attention_math``, the model's own eager
arithmetic). Which kwargs a model may pass at all is decided at load
(``model_runtime.attention.check``): anything else is refused there.

The step's metadata travels in one ``StepContext`` passed through the
forward's kwargs (transformers forwards unknown kwargs down to attention),
or, for a model whose decoder layers drop those kwargs, through the step
slot the load-time check installs on its attention modules (``StepSlot``).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from model_runtime import kernels
from model_runtime.attention import triton_paged
from model_runtime.attention.context import PrefillSpan, StepContext
from model_runtime.kv_cache import CacheShape

ATTENTION_NAME = "tokenstep_paged"
CONTEXT_KWARG = "tokenstep_context"
SLOT_ATTRIBUTE = "tokenstep_step_slot"


class StepSlot:
    """Where a step's context waits for the attention of a model whose
    decoder layers drop the forward's kwargs (Falcon, StableLM, Nemotron):
    the load-time check gives such a model one, on the model and on each
    attention module; ``step_forward`` fills it for the forward's duration."""

    __slots__ = ("context",)

    def __init__(self) -> None:
        self.context: object | None = None


def install_step_slot(model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> None:
    slot = StepSlot()
    for owner in (model, *attention_modules):
        setattr(owner, SLOT_ATTRIBUTE, slot)


def step_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, context: object, rows: torch.Tensor
) -> torch.Tensor:
    """The model's own forward over one step (``input_ids`` ``[1, T]``):
    logits ``[1, R, vocab]`` at ``rows`` ``[R]``, the context reaching
    attention through the forward's kwargs (and the model's slot, if it has one)."""
    slot = getattr(model, SLOT_ATTRIBUTE, None)
    if slot is not None:
        slot.context = context
    try:
        return model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=rows, **{CONTEXT_KWARG: context}
        ).logits
    finally:
        if slot is not None:
            slot.context = None


@dataclass(frozen=True, slots=True)
class LayerFeatures:
    """What one layer's attention computes beyond causal
    ``softmax(q . k * scale) v``, as transformers passes it to the layer's
    attention function."""

    scale: float
    sliding_window: int | None = None  # a query at p sees keys at p - window < k <= p
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap)
    sinks: torch.Tensor | None = None  # [heads]: one learned logit per head in every softmax's denominator

    @classmethod
    def from_kwargs(cls, kwargs: dict, scaling: float | None, head_dim: int) -> "LayerFeatures":
        window = kwargs.get("sliding_window")
        return cls(
            scale=scaling if scaling is not None else head_dim**-0.5,
            sliding_window=window if window else None,  # 0 and None both mean: no window
            softcap=kwargs.get("softcap") or None,
            sinks=kwargs.get("s_aux"),
        )

    @property
    def needs_math(self) -> bool:
        """SDPA cannot express soft-capping or sinks."""
        return self.softcap is not None or self.sinks is not None

    def first_visible(self, position: int) -> int:
        """The first key position a query at ``position`` sees."""
        return max(position - self.sliding_window + 1, 0) if self.sliding_window else 0


def runs_step_op(context: object) -> bool:
    """Whether attention in a step over ``context`` is the C++ step op
    (``paged_attention_step``): a ``StepContext`` with packed metadata and
    no Triton step. ``model_runtime.fused`` runs a whole layer in C++ only then."""
    return isinstance(context, StepContext) and context.triton is None and context.metadata is not None


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, head_dim]
    key: torch.Tensor,  # [1, kv_heads, T, head_dim]
    value: torch.Tensor,  # [1, kv_heads, T, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention over the paged cache; returns ``[1, T, heads, head_dim]``.

    A compiled forward (``model_runtime.step_graph``) passes its own context,
    which routes this layer through one opaque op that ends in ``attend``."""
    context = kwargs[CONTEXT_KWARG] if CONTEXT_KWARG in kwargs else getattr(module, SLOT_ATTRIBUTE).context
    layer = module.layer_idx
    features = LayerFeatures.from_kwargs(kwargs, scaling, query.shape[-1])
    if not isinstance(context, StepContext):
        return context.attend(query, key, value, layer, features), None
    if context.triton is not None:
        key_cache, value_cache = context.key_caches[layer], context.value_caches[layer]
        triton_paged.write_cache(key[0], value[0], key_cache, value_cache, context.triton.slot_mapping)
        return triton_paged.attention(
            query[0], key_cache, value_cache, context.triton, features.scale, features.sliding_window, features.softcap, features.sinks
        ).unsqueeze(0), None
    if runs_step_op(context):
        return kernels.load().paged_attention_step(
            query,
            key,
            value,
            context.key_caches[layer],
            context.value_caches[layer],
            context.metadata,
            features.scale,
            features.sliding_window or 0,
            features.softcap or 0.0,
            features.sinks,
        ), None
    return attend(query, key, value, context.key_caches[layer], context.value_caches[layer], context, features), None


def attend(
    query: torch.Tensor,  # [1, heads, T, head_dim]
    key: torch.Tensor,  # [1, kv_heads, T, head_dim]
    value: torch.Tensor,  # [1, kv_heads, T, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    context: StepContext,
    features: LayerFeatures,
) -> torch.Tensor:
    """Write this layer's new K/V, then attend: decode rows batched, each
    prefill chunk on its own. ``context``'s step metadata is used, not its
    caches. Returns ``[1, T, heads, value_head_dim]``."""
    write_cache(key_cache, value_cache, key[0], value[0], context.slot_mapping)
    if not context.prefills:  # decode rows only: the kernel's [B, heads, head_dim] is the output
        return _decode_attention(query[0], key_cache, value_cache, context, features).contiguous().unsqueeze(0)

    num_tokens, num_heads, value_head_dim = query.shape[2], query.shape[1], value_cache.shape[3]
    output = query.new_empty(num_tokens, num_heads, value_head_dim)  # [T, heads, value_head_dim]
    if context.num_decode_tokens:
        output[: context.num_decode_tokens] = _decode_attention(
            query[0, :, : context.num_decode_tokens], key_cache, value_cache, context, features
        )
    for span in context.prefills:
        rows = slice(span.start, span.start + span.num_new_tokens)
        output[rows] = _prefill_attention(query[0, :, rows], key_cache, value_cache, span, features)
    return output.unsqueeze(0)


def write_cache(
    key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """The step's new ``key``/``value`` ``[kv_heads, T, head_dim]`` into their slots."""
    is_native = key_cache.dtype == torch.float32 and key_cache.device.type == "cpu" and key_cache.shape == value_cache.shape
    if is_native and key.stride(-1) == 1 and value.stride(-1) == 1 and (ops := kernels.load()) is not None:
        ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    # key/value: [kv_heads, T, head_dim] -> [T, kv_heads, head_dim]
    key_cache.flatten(0, 1).index_copy_(0, slot_mapping, key.transpose(0, 1))
    value_cache.flatten(0, 1).index_copy_(0, slot_mapping, value.transpose(0, 1))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks of one or more sequences as ``[..., kv_heads, tokens, head_dim]``.

    ``index_select`` on the flattened block ids, not ``cache[block_ids]``:
    advanced indexing on CPU goes through a generic element-wise kernel, 3-4x
    slower than ``index_select``'s row copies (docs/PERFORMANCE.md,
    "Measurements behind choices").
    """
    gathered = cache.index_select(0, block_ids.reshape(-1)).view(
        *block_ids.shape, *cache.shape[1:]
    )  # [..., n_blocks, block_size, kv_heads, head_dim]
    gathered = gathered.flatten(-4, -3)  # [..., tokens, kv_heads, head_dim]
    return gathered.transpose(-3, -2)


def _decode_attention(
    query: torch.Tensor,  # [heads, B, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    context: StepContext,
    features: LayerFeatures,
) -> torch.Tensor:
    """``[B, heads, value_head_dim]``: each decode row over its own context."""
    if context.decode_context_mask is None:
        return kernels.load().paged_decode_attention(
            query.transpose(0, 1),
            key_cache,
            value_cache,
            context.decode_block_tables,
            context.decode_context_lens,
            features.scale,
            -1,
            features.sliding_window or 0,
            features.softcap or 0.0,
            features.sinks,
        )  # [B, heads, head_dim]
    keys = gather_blocks(key_cache, context.decode_block_tables)  # [B, kv_heads, L, head_dim]
    values = gather_blocks(value_cache, context.decode_block_tables)
    query = query.transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
    mask = context.decode_context_mask  # [B, 1, 1, L]
    if features.sliding_window:
        positions = torch.arange(mask.shape[-1], device=mask.device)
        first = context.decode_context_lens - features.sliding_window  # the query sits at len - 1
        mask = mask & (positions[None, :] >= first[:, None])[:, None, None, :]
    return _attention(query, keys, values, mask, features).squeeze(2)  # [B, heads, value_head_dim]


def _prefill_attention(
    query: torch.Tensor,  # [heads, n, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    span: PrefillSpan,
    features: LayerFeatures,
) -> torch.Tensor:
    """``[n, heads, value_head_dim]``: a chunk's queries over its cached
    tokens and itself. Only the blocks from the chunk's first visible key
    on are read (with a sliding window, older ones may hold another
    request's tokens by now)."""
    block_size = key_cache.shape[1]
    context_len = span.num_computed_tokens + span.num_new_tokens
    first_block = features.first_visible(span.num_computed_tokens) // block_size
    block_ids = span.block_ids[first_block : -(-context_len // block_size)]
    first_position = first_block * block_size
    keys = gather_blocks(key_cache, block_ids)[:, : context_len - first_position].unsqueeze(0)  # [1, kv_heads, ctx, head_dim]
    values = gather_blocks(value_cache, block_ids)[:, : context_len - first_position].unsqueeze(0)
    query = query.unsqueeze(0)  # [1, heads, n, head_dim]
    if span.num_computed_tokens == 0 and not features.sliding_window and not features.needs_math:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=features.scale, enable_gqa=_is_gqa(query, keys))
    else:
        query_positions = torch.arange(span.num_computed_tokens, context_len, device=query.device)
        key_positions = torch.arange(first_position, context_len, device=query.device)
        out = _attention(query, keys, values, causal_mask(query_positions, key_positions, features.sliding_window), features)
    return out[0].transpose(0, 1)  # [n, heads, value_head_dim]


def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """``[n, L]`` bool: which keys each query sees (causal, and within the window)."""
    visible = key_positions[None, :] <= query_positions[:, None]
    if sliding_window:
        visible &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return visible


def _attention(
    query: torch.Tensor,  # [B, heads, n, head_dim]
    keys: torch.Tensor,  # [B, kv_heads, L, head_dim]
    values: torch.Tensor,  # [B, kv_heads, L, value_head_dim]
    mask: torch.Tensor,  # bool, broadcastable to [B, heads, n, L]
    features: LayerFeatures,
) -> torch.Tensor:
    """Masked attention ``[B, heads, n, value_head_dim]``: SDPA, or plain
    math where the layer soft-caps its scores or has sinks."""
    if features.needs_math:
        return _attention_math(query, keys, values, mask, features)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=features.scale, enable_gqa=_is_gqa(query, keys))


def _attention_math(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, features: LayerFeatures
) -> torch.Tensor:
    """What the model's own eager attention computes: scores scaled, soft-capped
    (``softcap``), masked; sinks appended as one more logit per row and
    dropped after the softmax, which runs in float32. Shapes as ``_attention``."""
    group = query.shape[1] // keys.shape[1]
    if group > 1:  # GQA: each KV head serves ``group`` query heads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * features.scale  # [B, heads, n, L]
    if features.softcap is not None:
        scores = torch.tanh(scores / features.softcap) * features.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if features.sinks is not None:
        sinks = features.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1).float(), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores.float(), dim=-1)
    return torch.matmul(probs.to(values.dtype), values)


def _is_gqa(query: torch.Tensor, keys: torch.Tensor) -> bool:
    """Grouped-query attention: SDPA broadcasts KV heads itself (no repeat copies)."""
    return query.shape[-3] != keys.shape[-3]


DECODE_KERNEL_LANES = 16  # the kernel takes head_dim a multiple of this,
DECODE_KERNEL_MAX_HEAD_DIM = 512  # up to this


def decode_kernel_runs(shape: CacheShape, device: torch.device) -> bool:
    """Whether decode attention runs in tokenstep's kernel (float32 caches on
    the CPU, every layer's keys and values of one head_dim it takes, kernels
    built) rather than gather + SDPA."""
    head_dims_fit = all(
        layer.head_dim % DECODE_KERNEL_LANES == 0
        and layer.head_dim <= DECODE_KERNEL_MAX_HEAD_DIM
        and layer.value_head_dim == layer.head_dim
        for layer in shape.layers
    )
    return device.type == "cpu" and shape.dtype == torch.float32 and head_dims_fit and kernels.load() is not None


def register() -> str:
    """Register the backend with transformers; returns its implementation name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME

"""Whether tokenstep serves a decoder-only model exactly, decided at load.

tokenstep runs the model's own forward over one flat ragged batch, with its
own paged attention plugged in through transformers' ``AttentionInterface``.
That equals the model's own ``generate`` only when every layer's attention
reaches tokenstep's function with the step's context; when everything a
layer asks of attention is something tokenstep does (``LayerFeatures``:
scaling, sliding windows, soft-capping, sinks); and when nothing outside
attention mixes the sequences of the flat batch or reads positions other
than ``position_ids``. ``check_decoder`` proves this on the model itself,
before it serves, and refuses it with one line naming the feature otherwise:

1. **The config**: layer kinds other than full and sliding attention (Llama
   4's chunked layers, the linear-attention and state-space layers of hybrid
   models) and bidirectional attention.
2. **A recording pass**: one short forward that records each attention
   call: which layer, the kwargs it passes (each must be honoured or known to
   be meaningless here), its mask (a model that builds its own, ALiBi say,
   is refused) and the shapes of its keys and values, which size the KV
   cache (``CacheShape``; a config's ``num_key_value_heads`` may not be what
   the model does).
3. **A parity probe** (``model_runtime.attention.probe``): short ragged
   steps over a scratch cache against the model's own eager attention and
   cache, sliding windows shrunk so that it reaches past them.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel

from model_runtime.attention.interface import ATTENTION_NAME, CONTEXT_KWARG, install_step_slot, paged_attention_forward
from model_runtime.attention.probe import probe_sequences, prove_parity, run_served_steps
from model_runtime.kv_cache import CacheShape, LayerKV

# What tokenstep's attention does with each kwarg transformers' models pass:
# honoured (attention.LayerFeatures), or meaningless for a step over the
# paged cache (dropout is 0 in eval mode; positions were applied by the
# model's rotary embedding; cache flags). Anything else is refused at load.
HONOURED_KWARGS = {"sliding_window", "softcap", "s_aux"}
IGNORED_KWARGS = {
    "dropout",
    "position_ids",
    "use_cache",
    "output_attentions",
    "output_router_logits",
    "cache_position",
    "is_causal",
    CONTEXT_KWARG,
}
SERVED_LAYER_TYPES = {"full_attention", "sliding_attention"}
_LAYER_TYPE_NAMES = {
    "chunked_attention": "chunked attention (each query sees only its own chunk of tokens, as in Llama 4)",
    "linear_attention": "linear-attention layers (their state is not a KV cache)",
    "mamba": "state-space (Mamba) layers (their state is not a KV cache)",
    "conv": "convolution layers (their state is not a KV cache)",
}


class UnsupportedModelError(ValueError):
    """A model tokenstep cannot serve exactly; the message names the feature."""

    def __init__(self, model_type: str, feature: str) -> None:
        super().__init__(f"tokenstep cannot serve this {model_type!r} model exactly: {feature}")


@dataclass(frozen=True, slots=True)
class AttentionLayout:
    """A decoder-only model's attention as the load-time check observed it."""

    cache_shape: CacheShape
    sliding_windows: tuple[int | None, ...]  # per layer: tokens back it attends, None for all
    is_softcapped: bool
    has_sinks: bool

    @property
    def kv_window(self) -> int | None:
        """How far back any layer ever reads (KV older than that can go back
        to the pool), or None where some layer attends to every token."""
        windows = self.sliding_windows
        return max(windows) if windows and all(windows) else None

    def describe(self) -> str:
        """One phrase for the start-up log."""
        layers = self.cache_shape.layers
        sizes = [(layer.num_kv_heads, layer.head_dim, layer.value_head_dim) for layer in layers]
        parts = [
            f"{sizes.count(size)} layer{'s' * (sizes.count(size) != 1)} of {size[0]} KV heads x {size[1]}"
            + (f" (values {size[2]})" if size[2] != size[1] else "")
            for size in dict.fromkeys(sizes)
        ]
        if shared := sum(layer.shares_kv_of is not None for layer in layers):
            parts.append(f"{shared} layers reading earlier layers' keys and values")
        sliding = [w for w in self.sliding_windows if w]
        if sliding:
            parts.append(
                f"sliding window {'/'.join(str(w) for w in sorted(set(sliding)))} on {len(sliding)} of {len(self.sliding_windows)} layers"
            )
        parts += ["soft-capped scores"] * self.is_softcapped + ["attention sinks"] * self.has_sinks
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class AttentionCall:
    """What one attention call of the recording pass was handed."""

    layer: int | None
    kwargs: dict
    has_mask: bool
    is_causal: bool  # the kwarg if passed, else the module's own flag (as flash attention reads it)
    query_shape: tuple[int, ...]  # [1, heads, T, head_dim]
    key_shape: tuple[int, ...]  # [1, kv_heads, T, head_dim]
    value_shape: tuple[int, ...]  # [1, kv_heads, T, value_head_dim]
    kv_storage: tuple[int, int]  # where the key and value tensors' data live: a layer handed another's (KV sharing) repeats them
    module: torch.nn.Module  # the attention module (a slot goes there when the kwargs do not come through)


def check_decoder(model: PreTrainedModel) -> AttentionLayout:
    """Prove that tokenstep serves ``model`` (loaded with tokenstep's
    attention) exactly, or raise ``UnsupportedModelError``; returns what
    its attention looks like."""
    config = model.config.get_text_config(decoder=True)
    refuse = _refuser(config)
    _check_config(config, refuse)
    calls = _record(model, probe_sequences(model)[0], refuse)
    layout = _layout(calls, config, model.dtype, refuse)
    if any(CONTEXT_KWARG not in call.kwargs for call in calls):
        # Its decoder layers drop the forward's kwargs (Falcon, StableLM,
        # Nemotron): the step reaches attention through a slot instead.
        install_step_slot(model, [call.module for call in calls])
    prove_parity(model, layout.cache_shape, layout.sliding_windows, refuse)
    return layout


def check_served_linears(model: PreTrainedModel, layout: AttentionLayout) -> None:
    """After the loader put tokenstep's linears in ``model`` (checked by
    ``check_decoder`` before): its forward must still run, or raise
    ``UnsupportedModelError``."""
    run_served_steps(model, layout.cache_shape, _refuser(model.config.get_text_config(decoder=True)))


def _refuser(config: object) -> Callable[[str], UnsupportedModelError]:
    model_type = getattr(config, "model_type", "unknown")
    return lambda feature: UnsupportedModelError(model_type, feature)


def _check_config(config: object, refuse: Callable[[str], UnsupportedModelError]) -> None:
    for layer_type in dict.fromkeys(getattr(config, "layer_types", None) or []):
        if layer_type not in SERVED_LAYER_TYPES:
            raise refuse(_LAYER_TYPE_NAMES.get(layer_type, f"layers of type {layer_type!r}"))
    if getattr(config, "attention_chunk_size", None):
        raise refuse(_LAYER_TYPE_NAMES["chunked_attention"])
    if getattr(config, "alibi", False) is True or getattr(getattr(config, "attn_config", None), "alibi", False) is True:
        raise refuse("ALiBi position biases (added to the attention scores through the model's own mask)")
    if getattr(config, "is_causal", True) is False or getattr(config, "use_bidirectional_attention", False):
        raise refuse("bidirectional attention (tokenstep serves causal language models)")


@contextlib.contextmanager
def _attention_function(function: Callable) -> Iterator[None]:
    """tokenstep's attention name maps to ``function`` for the duration."""
    AttentionInterface.register(ATTENTION_NAME, function)
    try:
        yield
    finally:
        AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)


def _record(model: PreTrainedModel, token_ids: list[int], refuse: Callable[[str], UnsupportedModelError]) -> list[AttentionCall]:
    """The attention calls of one forward over ``token_ids``."""
    calls: list[AttentionCall] = []
    held: list[torch.Tensor] = []  # alive until the pass ends, so no two layers' tensors share an address by reuse

    def recording_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
        held.extend((key, value))
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        calls.append(
            AttentionCall(
                getattr(module, "layer_idx", None),
                dict(kwargs, scaling=scaling),
                attention_mask is not None,
                bool(is_causal),
                tuple(query.shape),
                tuple(key.shape),
                tuple(value.shape),
                (key.data_ptr(), value.data_ptr()),
                module,
            )
        )
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None  # [1, T, heads, value_head_dim]

    device = next(model.parameters()).device
    input_ids = torch.tensor([token_ids], device=device)
    with _attention_function(recording_forward), torch.inference_mode():
        try:
            model(
                input_ids=input_ids,
                position_ids=torch.arange(len(token_ids), device=device)[None],
                use_cache=False,
                **{CONTEXT_KWARG: "recording"},
            )
        except Exception as error:
            raise refuse(f"its forward fails with tokenstep's attention ({type(error).__name__}: {error})") from error
    return calls


def _layout(
    calls: list[AttentionCall], config: object, dtype: torch.dtype, refuse: Callable[[str], UnsupportedModelError]
) -> AttentionLayout:
    """Check the recorded calls; the cache shape and features they show."""
    num_layers = config.num_hidden_layers
    if not calls:
        raise refuse("its layers never call an attention function through transformers' AttentionInterface")
    layers = [call.layer for call in calls]
    if None in layers:
        raise refuse("its attention modules have no layer_idx")
    if sorted(layers) != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(layers))
        reason = (
            f"layers {missing} have no attention, and tokenstep's cache holds attention keys and values only"
            if missing
            else "some layer attends more than once in a forward"
        )
        raise refuse(reason)
    calls = sorted(calls, key=lambda call: call.layer)
    for call in calls:
        _check_call(call, refuse)
    # A layer handed the very keys and values of an earlier one (Gemma 3n and 4's KV sharing) reads that layer's cache.
    first_holder: dict[tuple[int, int], int] = {}
    for call in calls:
        first_holder.setdefault(call.kv_storage, call.layer)
    shares = [first_holder[call.kv_storage] if first_holder[call.kv_storage] != call.layer else None for call in calls]
    return AttentionLayout(
        CacheShape(
            tuple(LayerKV(call.key_shape[1], call.key_shape[3], call.value_shape[3], source) for call, source in zip(calls, shares)), dtype
        ),
        tuple(call.kwargs.get("sliding_window") or None for call in calls),
        any(call.kwargs.get("softcap") for call in calls),
        any(call.kwargs.get("s_aux") is not None for call in calls),
    )


def _check_call(call: AttentionCall, refuse: Callable[[str], UnsupportedModelError]) -> None:
    """Every kwarg of one call is honoured, meaningless here, or None."""
    kwargs = call.kwargs
    if call.has_mask:
        raise refuse(
            "it builds its own attention mask (ALiBi position biases or a custom pattern), which tokenstep's attention would ignore"
        )
    if not call.is_causal:
        raise refuse("bidirectional attention (tokenstep serves causal language models)")
    if kwargs.get("dropout"):
        raise refuse("attention dropout outside training")
    num_heads, num_kv_heads = call.query_shape[1], call.key_shape[1]
    if num_heads % num_kv_heads or call.value_shape[1] != num_kv_heads:
        raise refuse(f"layer {call.layer}'s {num_heads} query heads do not share its {num_kv_heads} KV heads evenly")
    sinks = kwargs.get("s_aux")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.shape != (call.query_shape[1],)):
        raise refuse("attention sinks of a shape other than one per query head")
    for name, value in kwargs.items():
        if name not in HONOURED_KWARGS | IGNORED_KWARGS | {"scaling"} and value is not None:
            raise refuse(f"its attention asks for {name!r}, which tokenstep's paged attention does not do")

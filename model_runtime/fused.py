"""One C++ op for each piece of elementwise work around a decoder layer's
matmuls, in tokenstep's eager CPU steps.

A one-row eager step is half Python and small ops: Llama's RMSNorm is seven
PyTorch ops, its rotary embedding sixteen, ``act_fn(gate) * up`` two, and
each costs microseconds of dispatch against a matmul of a few dozen. Here
each becomes one op of ``model_runtime.kernels`` (``tokenstep::rms_norm``,
``rotary``, ``silu_mul``), computing the model's own arithmetic: the same
products and sums in float32 (the rotary embedding to the bit; the norm's
sum of squares and SiLU's exponential in their own order, within a float32
rounding).

Nothing is assumed from a class name. A module qualifies by its shape (an
RMSNorm's ``weight`` and ``variance_epsilon``; an MLP's ``gate_proj``,
``up_proj``, ``down_proj`` and a SiLU ``act_fn``; the ``apply_rotary_pos_emb``
of its attention's Python module), and each kind is
fused only after the fused op gave the original's values on random inputs
(``fuse_elementwise``): Gemma's ``1 + weight`` norm, say, fails that and keeps
its own code.

Where a layer's query, key and value projections (or its MLP's gate and
up) are integer-activation linears that can share one call
(``model_runtime.weights.int_activations.side_by_side``), the fused code
calls them as one, and one op takes the merged output on
(``tokenstep::qkv_rotary``: the split, the heads' views and the rotary
embedding; ``silu_mul_halves``). Where every piece of such a layer has its
C++ form (both norms fused, q|k|v and gate|up merged, o and down quantized
linears on tokenstep's kernels, integer or float activations) and the step
runs tokenstep's C++ attention, the whole layer is one op,
``tokenstep::llama_layers``: the same C++ functions the Python layer calls,
in its order, without the dispatch of twenty torch ops from Python (most of
a one-row step on a slow core). Where every layer of a Llama model is so,
the model's forward runs them all in one call of that op.

The fused code runs only inside ``fused_steps()``, which the runner enters
for its eager steps: the load-time check and probes, ``--compile``'s traced
graph and any other model in the process run the original code.
"""

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from model_runtime.attention.interface import ATTENTION_NAME, CONTEXT_KWARG, LayerFeatures, runs_step_op
from model_runtime.weights.int_activations import IntActivationLinear, side_by_side
from model_runtime.weights.quantization import Int8Linear

logger = logging.getLogger(__name__)
_state = threading.local()
FUSED_MARK = "_tokenstep_fused"
MERGED = "_tokenstep_side_by_side"  # a module's projections merged into one call (not a submodule: counted nowhere else)
NATIVE = "_tokenstep_native_layer"  # a fused layer's _NativeLayer, where it has one


def _active() -> bool:
    return getattr(_state, "active", False)


@contextlib.contextmanager
def fused_steps() -> Iterator[None]:
    """Run the fused ops in this thread for the duration (one eager step)."""
    before = _active()
    _state.active = True
    try:
        yield
    finally:
        _state.active = before


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _is_gated_mlp(module: nn.Module) -> bool:
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))``'s parts (that act_fn is SiLU, the check proves)."""
    return all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _fuse_norm(module: nn.Module, ops: Any) -> None:
    original = module.forward

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if _active() and hidden_states.dtype == torch.float32 and hidden_states.device.type == "cpu":
            return ops.rms_norm(hidden_states, module.weight, module.variance_epsilon)
        return original(hidden_states)

    module.forward = forward


def _fuse_mlp(module: nn.Module, ops: Any) -> None:
    original = module.forward
    gate_up = module.__dict__[MERGED] = side_by_side([module.gate_proj, module.up_proj])

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _active() and x.dtype == torch.float32 and x.device.type == "cpu":
            if gate_up is not None:
                return module.down_proj(ops.silu_mul_halves(gate_up(x)))
            return module.down_proj(ops.silu_mul(module.gate_proj(x), module.up_proj(x)))
        return original(x)

    module.forward = forward


def _rotary_wrapper(original: Callable, ops: Any) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (
            _active()
            and unsqueeze_dim == 1
            and q.dim() == 4
            and q.dtype == k.dtype == cos.dtype == sin.dtype == torch.float32
            and q.device.type == "cpu"
            and cos.dim() == 3
            and cos.shape[-1] == q.shape[-1] == k.shape[-1]
        ):
            return ops.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    setattr(apply_rotary_pos_emb, FUSED_MARK, original)
    return apply_rotary_pos_emb


def _rotary_modules(model: nn.Module) -> list[Any]:
    """The Python modules whose ``apply_rotary_pos_emb`` this model's attention calls."""
    found = {}
    for module in model.modules():
        source = sys.modules.get(type(module).__module__) if hasattr(module, "q_proj") else None
        if source is not None and hasattr(source, "apply_rotary_pos_emb"):
            found[source.__name__] = source
    return list(found.values())


def _restore(module: nn.Module, original: Callable) -> None:
    """Undo a fused forward: the class's own again, or the instance's own if it had one."""
    if getattr(original, "__self__", None) is module and getattr(original, "__func__", None) is getattr(type(module), "forward", None):
        del module.forward
    else:
        module.forward = original


@torch.inference_mode()
def _same(fused: Callable[[], Any], original: Callable[[], Any], exact: bool) -> bool:
    with fused_steps():
        got = fused()
    want = original()
    pairs = zip(got, want, strict=True) if isinstance(want, tuple) else [(got, want)]
    return all(torch.equal(a, b) if exact else within_rounding(a, b) for a, b in pairs)


def within_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """``got`` differs from ``want`` by float rounding only: every element
    within 1e-5 of ``want``'s largest magnitude (plus 1e-6). Against the
    largest, not each element's own: an output near zero is the difference
    of large terms, and a rounding of the terms moves it by far more than
    its own size (a fused SiLU's last bit before a down projection; GGUF
    Q4_K_M's first MLP on AVX2 failed an element-wise tolerance so, and
    lost the whole-model op). Other arithmetic (GELU for SiLU, a norm's
    1 + weight) differs by a good part of the values."""
    if got.shape != want.shape:
        return False
    return want.numel() == 0 or bool((got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6)


def fuse_elementwise(model: nn.Module, ops: Any) -> str:
    """Fuse what qualifies in ``model`` (module docstring); says what is fused, for the start log."""
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if _is_rms_norm(m) and m.weight.dtype == torch.float32]
    mlps = [m for m in model.modules() if _is_gated_mlp(m) and isinstance(getattr(m.gate_proj, "in_features", None), int)]
    # Each class is proved apart: a model may hold two norms of different arithmetic.
    fused = [
        *(
            _fuse_all(same, "RMSNorms", _fuse_norm, ops, lambda m: torch.randn(3, m.weight.numel(), generator=generator) * 4)
            for same in _by_class(norms)
        ),
        *(
            _fuse_all(same, "SiLU MLPs", _fuse_mlp, ops, lambda m: torch.randn(2, m.gate_proj.in_features, generator=generator))
            for same in _by_class(mlps)
        ),
        *(_fuse_rotary(source, ops, generator) for source in _rotary_modules(model)),
    ]
    parts = [
        ", ".join(part for part in fused if part) + " as one C++ op each" if any(fused) else "",
        _fuse_llama_layers(model, ops, generator),
    ]
    fused_modules = [m for m in model.modules() if hasattr(m, FUSED_MARK)]
    # a fused layer's attention holds its merged query, key and value projections; a fused MLP its gate and up
    if merged := sum(getattr(m, "self_attn", m).__dict__.get(MERGED) is not None for m in fused_modules):
        parts.append(f"{merged} groups of projections that read one input in one call each")
    if stacked := _fuse_llama_model(model, ops):
        parts.append(f"all {stacked} decoder layers as one C++ op where the step's attention is tokenstep's C++ op")
    elif native := sum(m.__dict__.get(NATIVE) is not None for m in fused_modules):
        parts.append(f"{native} decoder layers as one C++ op each where the step's attention is tokenstep's C++ op")
    return "; ".join(part for part in parts if part) or "nothing fused"


def _by_class(modules: list[nn.Module]) -> list[list[nn.Module]]:
    groups: dict[type, list[nn.Module]] = {}
    for module in modules:
        groups.setdefault(type(module), []).append(module)
    return list(groups.values())


def _fuse_all(
    modules: list[nn.Module], label: str, fuse: Callable[[nn.Module, Any], None], ops: Any, sample: Callable[[nn.Module], torch.Tensor]
) -> str:
    """Fuse ``modules`` (all of one class) if the first gives its own values fused; what was fused, or ''."""
    if modules and not hasattr(modules[0], FUSED_MARK):  # else fused at an earlier load of this model object
        probe, x = modules[0], sample(modules[0])
        original = probe.forward
        fuse(probe, ops)
        if not _same(lambda: probe.forward(x), lambda: original(x), exact=False):
            _restore(probe, original)
            # Said, not silent: a Llama MLP that does not fuse also keeps its layers off the whole-model op.
            logger.info(
                "%d %s of class %s keep their own code: the fused form differs beyond rounding", len(modules), label, type(probe).__name__
            )
            return ""
        for module in modules[1:]:
            fuse(module, ops)
        for module in modules:
            setattr(module, FUSED_MARK, True)
    return f"{len(modules)} {label}" if modules and hasattr(modules[0], FUSED_MARK) else ""


def _fuse_rotary(source: Any, ops: Any, generator: torch.Generator) -> str:
    """Fuse the ``apply_rotary_pos_emb`` of the Python module ``source`` if it
    is Llama's (q, k, cos, sin) in rotate-half form, to the bit; what was fused, or ''."""
    function = source.apply_rotary_pos_emb
    original = getattr(function, FUSED_MARK, function)
    wrapper = function if hasattr(function, FUSED_MARK) else _rotary_wrapper(original, ops)
    # [1, heads, T, D] views of [1, T, heads, D], as the projections' outputs are.
    q = torch.randn(1, 3, 4, 8, generator=generator).transpose(1, 2)
    k = torch.randn(1, 3, 2, 8, generator=generator).transpose(1, 2)
    angles = torch.rand(1, 3, 8, generator=generator) * 6
    cos, sin = angles.cos(), angles.sin()
    try:
        same = _same(lambda: wrapper(q, k, cos, sin), lambda: original(q, k, cos, sin), exact=True)
    except (TypeError, RuntimeError, ValueError):  # another signature or shape: not Llama's
        same = False
    if not same:
        return ""
    source.apply_rotary_pos_emb = wrapper
    return f"rotary embedding ({source.__name__.rsplit('.', 1)[-1]})"


def _fuse_llama_layers(model: nn.Module, ops: Any, generator: torch.Generator) -> str:
    """Llama's own decoder layers run as one Python function each: the same
    calls in the same order as ``LlamaDecoderLayer.forward`` and
    ``LlamaAttention.forward``, without the layers around them
    (``nn.Module.__call__`` for the attention, both norms and the MLP, the
    kwarg-renaming decorators, the hub-kernel wrapper): 0.6-0.9 ms of a
    13 ms one-row step of the default model (Zen 4, in-process A/B), 0.8-4 ms
    of 15 ms on Zen 3 (docs/PERFORMANCE.md). Only layers whose classes run those
    two forwards unchanged qualify (a subclass that passes more to attention,
    a sliding window say, runs its own), only with the rotary embedding
    fused, and only after the first layer gave its own output to the bit.
    What was done, or ''."""
    from transformers.models.llama import modeling_llama as llama

    layers = [
        m
        for m in model.modules()
        if type(m).forward is llama.LlamaDecoderLayer.forward
        and type(getattr(m, "self_attn", None)).forward is llama.LlamaAttention.forward
        and hasattr(sys.modules[type(m.self_attn).__module__].apply_rotary_pos_emb, FUSED_MARK)
    ]
    if not layers:
        return ""
    if not hasattr(layers[0], FUSED_MARK):
        first, original = layers[0], layers[0].forward
        _fuse_layer(first, ops)
        if not _same_layer(model, first, original, generator):
            _restore(first, original)
            return ""
        for layer in layers:
            if layer is not first:
                _fuse_layer(layer, ops)
            setattr(layer, FUSED_MARK, True)
    return f"{len(layers)} decoder layers as one function each"


def _native_linear(linear: nn.Module) -> tuple[list[torch.Tensor], torch.Tensor | None, list[int]] | None:
    """What ``tokenstep::llama_layers`` takes of one of a layer's linears
    (ops.cpp's ``layer_linear``): its three tensors, its bias and five ints;
    None where it has no form there."""
    if type(linear) is IntActivationLinear:
        buffers, ints = linear._buffers, [linear.bits, linear.act_bits, linear.out_features, linear.isa, 0]
    elif type(linear) is Int8Linear and linear.ops is not None:  # float activations (GGUF's Q6_K)
        rows = 0 if linear.gemm_from_rows == float("inf") else int(linear.gemm_from_rows)
        buffers, ints = {**linear._buffers, "codes": linear._buffers["q"]}, [8, 32, linear.out_features, linear.isa, rows]
    else:
        return None
    return [buffers["codes"], buffers["scales"], buffers["offsets"]], linear._parameters.get("bias"), ints


def _fuse_llama_model(model: nn.Module, ops: Any) -> int:
    """A Llama model (``LlamaModel.forward``, unchanged) whose every decoder
    layer is native runs them all as one op in eager steps: its embedding,
    rotary embedding and final norm as its forward runs them, the layers
    through ``tokenstep::llama_layers`` in one call, without the model's
    decorators, the causal mask tokenstep's attention never reads and thirty
    calls of Python. How many layers run so (0: none)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast
    from transformers.models.llama import modeling_llama as llama

    inner = next((m for m in model.modules() if type(m).forward is llama.LlamaModel.forward), None)
    if inner is None:
        return 0
    if hasattr(inner, FUSED_MARK):  # at an earlier load of this model object
        return inner.__dict__[FUSED_MARK]
    natives = [layer.__dict__.get(NATIVE) for layer in inner.layers[: inner.config.num_hidden_layers]]
    if not natives or None in natives:
        return 0
    stack, original = _NativeStack(natives), inner.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, use_cache=None, **kwargs):
        # Only the steps the runner makes (input ids, positions, the context and nothing else) on the op's inputs.
        if _active() and input_ids is not None and position_ids is not None and kwargs.keys() == {CONTEXT_KWARG}:
            if attention_mask is None and cache is None and inputs_embeds is None and not use_cache:
                hidden = inner.embed_tokens(input_ids)
                cos, sin = inner.rotary_emb(hidden, position_ids=position_ids)
                if stack.runs(hidden, cos, sin, kwargs[CONTEXT_KWARG]):
                    hidden = stack(ops, hidden, cos, sin, kwargs[CONTEXT_KWARG], kwargs)
                    return BaseModelOutputWithPast(last_hidden_state=inner.norm(hidden))
        return original(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

    inner.forward = forward
    inner.__dict__[FUSED_MARK] = len(natives)
    return len(natives)


class _NativeLayer:
    """What ``tokenstep::llama_layers`` needs of one fused layer whose every
    piece has its C++ form (both norms fused, q|k|v and gate|up merged
    integer-activation linears, o and down quantized linears on tokenstep's
    kernels): the same calls the Python layer makes, in its order, from one
    op call. Its tensors and numbers are read once, here: the loader chose
    the linears' instruction sets before the layers were fused (the merged
    linears copied them then too)."""

    def __init__(
        self, layer: nn.Module, linears: list[tuple[list[torch.Tensor], torch.Tensor | None, list[int]]], qkv: IntActivationLinear
    ) -> None:
        attention = layer.self_attn
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        self.weights, self.biases, self.ints = [norms[0].weight], [], []
        for tensors, bias, ints in linears:
            self.weights += tensors
            self.biases.append(bias)
            self.ints += ints
        self.weights.insert(7, norms[1].weight)
        self.ints += [attention.head_dim, *qkv.split_sizes[:2]]
        scale = LayerFeatures.from_kwargs({}, attention.scaling, attention.head_dim).scale
        self.floats = [norms[0].variance_epsilon, norms[1].variance_epsilon, scale]
        self.layer_idx, self.config = attention.layer_idx, attention.config

    @classmethod
    def of(cls, layer: nn.Module, qkv: IntActivationLinear | None) -> "_NativeLayer | None":
        mlp = layer.mlp
        gate_up = mlp.__dict__.get(MERGED) if hasattr(mlp, FUSED_MARK) else None
        norms_fused = all(hasattr(norm, FUSED_MARK) for norm in (layer.input_layernorm, layer.post_attention_layernorm))
        merged = all(type(part) is IntActivationLinear for part in (qkv, gate_up))
        if not (norms_fused and merged):
            return None
        linears = [_native_linear(part) for part in (qkv, layer.self_attn.o_proj, gate_up, getattr(mlp, "down_proj", None))]
        return cls(layer, linears, qkv) if None not in linears else None


class _NativeStack:
    """Consecutive native layers (``_NativeLayer``) as one call of
    ``tokenstep::llama_layers``: their lists joined once, here."""

    def __init__(self, layers: list[_NativeLayer]) -> None:
        self.weights = [weight for layer in layers for weight in layer.weights]
        self.biases = [bias for layer in layers for bias in layer.biases]
        self.ints = [number for layer in layers for number in layer.ints]
        self.floats = [number for layer in layers for number in layer.floats]
        self.layer_idxs = [layer.layer_idx for layer in layers]
        self.config = layers[0].config

    def runs(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: Any) -> bool:
        """Whether a step with these inputs is one the op computes as the Python layers do."""
        return (
            runs_step_op(context)
            and hidden.dim() == 3
            and hidden.dtype == torch.float32
            and hidden.device.type == "cpu"
            and cos.dim() == 3
            and cos.dtype == sin.dtype == torch.float32
            and self.config._attn_implementation == ATTENTION_NAME
        )

    def __call__(self, ops: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: Any, kwargs: dict) -> torch.Tensor:
        features = LayerFeatures.from_kwargs(kwargs, None, 1)  # the window, soft-cap and sinks (the scale is each layer's)
        return ops.llama_layers(
            hidden,
            self.weights,
            self.biases,
            self.ints,
            self.floats,
            cos,
            sin,
            [context.key_caches[i] for i in self.layer_idxs],
            [context.value_caches[i] for i in self.layer_idxs],
            context.metadata,
            features.sliding_window or 0,
            features.softcap or 0.0,
            features.sinks,
        )


def _fuse_layer(layer: nn.Module, ops: Any) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    original = layer.forward
    attention, rotary_source = layer.self_attn, sys.modules[type(layer.self_attn).__module__]
    qkv = attention.__dict__[MERGED] = side_by_side([attention.q_proj, attention.k_proj, attention.v_proj])
    if qkv is not None and not (qkv.split_sizes[1] == qkv.split_sizes[2] and qkv.split_sizes[0] % attention.head_dim == 0):
        qkv = attention.__dict__[MERGED] = None  # qkv_rotary's layout: whole heads, keys and values alike
    native = _NativeLayer.of(layer, qkv)
    layer.__dict__[NATIVE] = native
    native_step = None if native is None else _NativeStack([native])

    def forward(
        hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None, use_cache=False, position_embeddings=None, **kwargs
    ):
        if not (_active() and cache is None and position_embeddings is not None and hidden_states.dtype == torch.float32):
            return original(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        cos, sin = position_embeddings
        context = kwargs.get(CONTEXT_KWARG)
        if native_step is not None and native_step.runs(hidden_states, cos, sin, context):
            return native_step(ops, hidden_states, cos, sin, context, kwargs)  # all of the below in one op
        # LlamaDecoderLayer.forward, with LlamaAttention.forward (no cache) written out in it.
        residual = hidden_states
        hidden_states = layer.input_layernorm.forward(hidden_states)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attention.head_dim)
        if qkv is not None and hidden_states.dim() == 3 and cos.dim() == 3 and cos.dtype == sin.dtype == torch.float32:
            # the fused rotary embedding's own arithmetic (its conditions, checked here), one op from the merged output
            query_states, key_states, value_states = ops.qkv_rotary(qkv(hidden_states), cos, sin, attention.head_dim, *qkv.split_sizes[:2])
        else:
            query_states = attention.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            key_states = attention.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            value_states = attention.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            query_states, key_states = rotary_source.apply_rotary_pos_emb(query_states, key_states, cos, sin)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
        attn_output, _ = attention_interface(
            attention,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not attention.training else attention.attention_dropout,
            scaling=attention.scaling,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        attn_output = attention.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        hidden_states = residual + attn_output
        residual = hidden_states
        hidden_states = layer.post_attention_layernorm.forward(hidden_states)
        return residual + layer.mlp.forward(hidden_states)

    layer.forward = forward


@torch.inference_mode()
def _same_layer(model: nn.Module, layer: nn.Module, original: Callable, generator: torch.Generator) -> bool:
    """The fused ``layer`` against its ``original`` forward, both with the
    fused ops, on random hidden states of a few positions and SDPA's causal
    attention (tokenstep's needs a step): the same values to the bit."""
    attention = layer.self_attn
    hidden = torch.randn(1, 5, attention.q_proj.in_features, generator=generator)
    angles = torch.rand(1, 5, attention.head_dim // 2, generator=generator) * 6
    angles = torch.cat((angles, angles), dim=-1)
    position_embeddings = (angles.cos(), angles.sin())
    implementation = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with fused_steps():
            got = layer.forward(hidden, position_embeddings=position_embeddings, position_ids=torch.arange(5)[None])
            want = original(hidden, position_embeddings=position_embeddings, position_ids=torch.arange(5)[None])
    except (TypeError, RuntimeError, ValueError):
        return False
    finally:
        model.set_attn_implementation(implementation)
    return torch.equal(got, want)

"""The step forward compiled whole with ``torch.compile`` (``--compile``).

Eager, a decode step is thousands of small torch ops plus the Python of
every decoder layer; compiled, inductor fuses the norms, RoPE, activations
and residual adds into a few C++ kernels per layer and the Python disappears
(the step times: docs/PERFORMANCE.md, "Measurements behind choices in the
code"). The model's own forward is what gets compiled (no model
code of ours); attention stays tokenstep's: the graph sees it as one opaque
op per layer (tokenstep's C++ ``paged_attention_step`` where the kernels
run, else ``tokenstep_graph::paged_attention``, registered below), whose step metadata
travels as one int64 tensor, so no Python object of the step (block tables,
prefill spans) becomes a guard of the graph.

Where the data lives: the runner builds a ``StepContext`` (tensors, as in
eager mode); ``attention.metadata.pack`` flattens its metadata into one int64 tensor; the graph
passes that tensor to each layer's op; the op's ``unpack`` rebuilds the
``StepContext`` as views of it (once per step: it is remembered by the step's
serial number) and runs ``attention.attend``, as eager mode does.

Shapes: the step's token count T and the number of kept logits rows are
dynamic, and one graph serves every size (sizes 0 and 1 are not special
cased, and the quantized linears switch kernels inside their C++ op);
``warm_up`` compiles every graph at start so that no request waits for a
compile.
"""

import functools
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_runtime.attention.context import SequenceChunk, StepContext, build_step
from model_runtime.attention.interface import CONTEXT_KWARG, LayerFeatures, attend
from model_runtime.attention.metadata import pack, unpack

logger = logging.getLogger(__name__)


@torch.library.custom_op("tokenstep_graph::paged_attention", mutates_args=("key_cache", "value_cache"))
def paged_attention(
    query: torch.Tensor,  # [1, heads, T, head_dim]
    key: torch.Tensor,  # [1, kv_heads, T, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    metadata: torch.Tensor,  # int64 [n]: pack()
    scaling: float,
    window: int,  # the layer's LayerFeatures, 0 / 0.0 / None for none
    softcap: float,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One layer's paged attention as the graph sees it: ``[1, T, heads, value_head_dim]``."""
    features = LayerFeatures(scaling, window or None, softcap or None, sinks)
    return attend(query, key, value, key_cache, value_cache, unpack(metadata), features)


@paged_attention.register_fake
def _(query, key, value, key_cache, value_cache, metadata, scaling, window, softcap, sinks):
    return query.new_empty(1, query.shape[2], query.shape[1], value_cache.shape[3])


@functools.cache
def _register_kernel_fakes() -> None:
    """Shapes of tokenstep's C++ ops (``model_runtime.kernels``) for tracing
    (registered with torch once per process: ``functools.cache``)."""
    from model_runtime import kernels

    if kernels.load() is None:
        return
    for kind in ("int8", "int4"):

        def linear_fake(x, q, scales, offsets, bias, isa=-1, gemm_from_rows=0):
            return x.new_empty(*x.shape[:-1], q.shape[0])

        def dequantize_fake(q, scales, offsets, isa=-1, packed=kind == "int4"):
            return q.new_empty(q.shape[0], q.shape[1] * (2 if packed else 1), dtype=torch.float32)

        torch.library.register_fake(f"tokenstep::{kind}_linear", linear_fake)
        torch.library.register_fake(f"tokenstep::{kind}_dequantize", dequantize_fake)

    def int_linear_fake(x, codes, scales, offsets, bias, bits, act_bits, out_features, isa=-1):
        return x.new_empty(*x.shape[:-1], out_features)

    torch.library.register_fake("tokenstep::int_linear", int_linear_fake)

    def attention_fake(query, key, value, key_cache, value_cache, metadata, scale, window=0, softcap=0.0, sinks=None):
        return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])

    torch.library.register_fake("tokenstep::paged_attention_step", attention_fake)


@dataclass(frozen=True)
class GraphStepContext:
    """What the compiled forward passes down to attention instead of a
    ``StepContext``: the caches and the packed metadata, tensors only."""

    key_caches: list[torch.Tensor]
    value_caches: list[torch.Tensor]
    metadata: torch.Tensor
    native: bool  # tokenstep's C++ op for the whole layer (the kernels run), else the Python op above

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, features: LayerFeatures) -> torch.Tensor:
        op = torch.ops.tokenstep.paged_attention_step if self.native else torch.ops.tokenstep_graph.paged_attention
        return op(
            query,
            key,
            value,
            self.key_caches[layer],
            self.value_caches[layer],
            self.metadata,
            features.scale,
            features.sliding_window or 0,
            features.softcap or 0.0,
            features.sinks,
        )


class CompiledForward:
    """``model(...)`` of one step, compiled once per shape class."""

    def __init__(self, model: torch.nn.Module, native: bool = False) -> None:
        _register_kernel_fakes()
        self.model = model
        self.native = native
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # One graph for every step size: without this, sizes 0 and 1 (one
        # token, one kept row) would each get a graph of their own.
        torch.fx.experimental._config.backed_size_oblivious = True
        # Nor should the step's one sequence dimension be unified with the
        # batch dimension when a step has one token.
        torch.fx.experimental._config.use_duck_shape = False
        # The model's float constants (norm epsilons, attention scaling, RoPE
        # factors) stay constants: as dynamic float inputs, dynamo traced the
        # whole model, specialized them anyway and traced it again (the first
        # pass, about 35 of 60 s at a start with a warm cache, was thrown away).
        torch._dynamo.config.specialize_float = True
        if not hasattr(model, COMPILED_ATTRIBUTE):
            compiled = torch.compile(_own_copy(_step_forward), dynamic=True, fullgraph=True, options={"guard_filter_fn": _step_guards})
            object.__setattr__(model, COMPILED_ATTRIBUTE, compiled)  # not a submodule nor a parameter
        self._compiled = getattr(model, COMPILED_ATTRIBUTE)

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, context: StepContext, logits_rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[1, R, vocab]`` at ``logits_rows`` ``[R]`` of the step."""
        metadata = context.metadata if context.metadata is not None else pack(context)
        graph_context = GraphStepContext(context.key_caches, context.value_caches, metadata, self.native)
        return self._compiled(self.model, input_ids, position_ids, logits_rows, graph_context)


def _step_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_rows: torch.Tensor, context: GraphStepContext
) -> torch.Tensor:
    return model(
        input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_rows, **{CONTEXT_KWARG: context}
    ).logits


# Dynamo keeps its graphs on the code object it traced, and the guards a
# step keeps (below) say nothing of which model runs: two models compiled
# from one code object would run each other's graphs. So each model gets a
# copy of the code of its own, kept on the model (under COMPILED_ATTRIBUTE)
# and shared by every CompiledForward of that model.
COMPILED_ATTRIBUTE = "tokenstep_compiled_step"


def _own_copy(function: Callable) -> Callable:
    """``function`` with a code object of its own (so a cache of its own)."""
    return types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )


# The guards a compiled step keeps: the shapes of the step's own inputs and
# the symbolic-shape relations between them (which graph a step size takes).
# The rest (about 8,000 guards on the model's modules, parameters, caches and
# the context's type, which never change after load) cost 2.5 ms a step.
_KEPT_TENSOR_GUARDS = {"input_ids", "position_ids", "logits_rows", "context.metadata"}
_KEPT_GUARD_TYPES = {"SHAPE_ENV", "GRAD_MODE", "GLOBAL_STATE", "TORCH_FUNCTION_STATE", "DEFAULT_DEVICE", "DETERMINISTIC_ALGORITHMS"}


def _step_guards(entries: list) -> list[bool]:
    return [
        entry.guard_type in _KEPT_GUARD_TYPES or (entry.guard_type == "TENSOR_MATCH" and entry.name in _KEPT_TENSOR_GUARDS)
        for entry in entries
    ]


RECOMPILE_LIMIT = 32  # shape classes: T = 1 or not, kept rows 1 or not


def warm_up(
    forward: CompiledForward, key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], max_num_tokens: int, with_mask: bool
) -> None:
    """Compile every shape class a step can take before serving: one decode
    row alone; then, for 2 and the largest step size, that many decode rows,
    a prefill of that many tokens alone, and one beside two decode rows. The
    steps write garbage into the first blocks of the pool, which nothing
    holds yet at start."""
    start = time.perf_counter()
    shapes = [(1, 0)] + [shape for n in sorted({2, max_num_tokens}) for shape in ((n, 0), (0, n), (2, n))]
    for num_decode, num_prefill in shapes:
        input_ids, position_ids, context, rows = _synthetic_step(num_decode, num_prefill, key_caches, value_caches, with_mask)
        forward(input_ids, position_ids, context, rows)
    logger.info("compiled the step forward for %d step shapes in %.1f s", len(shapes), time.perf_counter() - start)


def _synthetic_step(
    num_decode: int, num_prefill: int, key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor, StepContext, torch.Tensor]:
    """A step of ``num_decode`` one-token rows at position ``block_size``
    (two blocks each) then one fresh prefill of ``num_prefill`` tokens, on
    block ids wrapped into the pool: its inputs, context and the rows whose
    logits a real step would keep."""
    num_blocks, block_size = key_caches[0].shape[:2]
    chunks = [SequenceChunk([0], block_size, [(2 * row) % num_blocks, (2 * row + 1) % num_blocks]) for row in range(num_decode)]
    if num_prefill:
        chunks.append(
            SequenceChunk([0] * num_prefill, 0, [(2 * num_decode + i) % num_blocks for i in range(-(-num_prefill // block_size))])
        )
    input_ids, position_ids, context = build_step(chunks, key_caches, value_caches, key_caches[0].device, with_mask)
    rows = list(range(num_decode)) + ([num_decode + num_prefill - 1] if num_prefill else [])
    return input_ids, position_ids, context, torch.tensor(rows, device=input_ids.device)

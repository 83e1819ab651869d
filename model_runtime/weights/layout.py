"""CPU weight layout for the linear layers, chosen per dtype.

**float32:** store ``nn.Linear`` weights as ``[in, out]`` in memory.
``F.linear(x, W)`` multiplies by ``W.t()``. With the default ``[out, in]``
storage that is a transposed operand, and at the small row counts of a decode
step (1-64 rows) MKL's GEMM runs up to 2-3x slower on it than on a contiguous
``[in, out]`` matrix.
Re-laying each weight out as ``W.t().contiguous().t()`` keeps its shape and
values (the model's code is untouched) and changes only its strides. The LM
head is left alone: at 49152 outputs the default layout is faster, and it is
often tied to the input embedding, which must stay row-major for lookups.

**bfloat16** (on CPUs with native bf16: AMX or AVX512-BF16): every linear,
the LM head included, becomes a ``PackedLinear`` whose weight is reordered
once into oneDNN's blocked layout and multiplied by oneDNN (AMX tiles where
present), faster than plain bf16 at every batch size measured.

**float32, small models** (linears of at most ``DUAL_LAYOUT_MAX_BYTES``, the
default model's 540 MB): which kernel is faster at a few rows depends on the
CPU, so it is measured at load time (``choose_packed_from_rows``: the model's
own linears, one pass over all their weights as in a decode step, at 1, 2
and 4 rows). Packing was better from 16 rows on both hosts measured, but for
a single row an Intel host (AMX) ran MKL's ``[in, out]`` GEMV faster while an
AMD EPYC (Zen 5) ran oneDNN's packed kernel faster. So each linear is a
``RowSwitchedLinear``: the ``[in, out]`` weight below ``packed_from_rows``
rows, the packed one from there; when packing wins from one row, the
``[in, out]`` copy is dropped and the model holds its weights once.

The measurements behind each choice, with host and date:
docs/PERFORMANCE.md, "Measurements behind choices in the code".
"""

import time
from collections.abc import Callable

import torch
from torch import nn

# oneDNN's packed linear as an opaque op for compiled forwards
# (``model_runtime.step_graph``): inductor's own lowering of
# ``mkldnn._linear_pointwise`` rejects dynamic row counts. A plain
# ``Library`` op: a ``torch.library.custom_op`` costs about 4x more per call.
_GRAPH_OPS = torch.library.Library("tokenstep_layout", "DEF")
_GRAPH_OPS.define("packed_linear(Tensor x, Tensor packed_weight, Tensor? bias) -> Tensor")
_GRAPH_OPS.impl("packed_linear", lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), "CompositeExplicitAutograd")
torch.library.register_fake("tokenstep_layout::packed_linear", lambda x, w, b: x.new_empty(*x.shape[:-1], w.shape[0]))


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.t() + bias`` with ``W`` packed by ``mkldnn._reorder_linear_weight``."""
    if torch.compiler.is_compiling():
        return torch.ops.tokenstep_layout.packed_linear(x, packed_weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


# oneDNN picks its blocked layout for an expected row count; decode steps
# run 1-64 rows and 16 measured as well as any other hint at every size in
# bf16; for float32, 64 did better (see the module docstring).
_PACKING_ROWS_HINT = 16
_FLOAT32_PACKING_ROWS_HINT = 64
PACKED_FROM_ROWS = 8
DUAL_LAYOUT_MAX_BYTES = 2 * 2**30


def has_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AMX tiles or AVX512-BF16) and oneDNN is built in."""
    return torch.backends.mkldnn.is_available() and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight prepacked for oneDNN (CPU, inference only).

    The original weight is not kept: a tied input embedding keeps its own
    tensor, so the model holds the LM head twice (once packed).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), _PACKING_ROWS_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


class RowSwitchedLinear(nn.Module):
    """float32 ``nn.Linear`` with its weight packed for oneDNN and, while
    ``packed_from_rows`` > 1, also laid out ``[in, out]`` for MKL, which
    serves inputs of fewer rows. Inference only.

    ``weight`` is that ``[in, out]`` copy, for model code that reads a
    projection's weight outside the projection (Ergo reads
    ``o_proj.weight.dtype``): a read sets ``read_outside``, and
    ``free_unread_copies`` keeps the copy of such a module."""

    def __init__(self, linear: nn.Linear, packed_from_rows: int = PACKED_FROM_ROWS) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_from_rows = packed_from_rows
        self.read_outside = False
        with torch.no_grad():
            weight = linear.weight.detach()
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _FLOAT32_PACKING_ROWS_HINT)
            self.register_buffer("input_major_weight", weight.t().contiguous().t(), persistent=False)
            self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor | None:
        self.read_outside = True
        return self.input_major_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features >= self.packed_from_rows:
            return self.packed_forward(x)
        return self.mkl_forward(x)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)

    def mkl_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.input_major_weight, self.bias)

    def use_packed_from(self, rows: int) -> None:
        """Switch at ``rows``; from 1 row on, ``free_unread_copies`` frees the ``[in, out]`` copy."""
        self.packed_from_rows = rows


def free_unread_copies(model: nn.Module) -> int:
    """Free the ``[in, out]`` copy of every ``RowSwitchedLinear`` that packs
    from one row on and whose weight nothing read from outside (run the
    model's forward first); returns how many copies stay for such reads."""
    kept = 0
    for module in model.modules():
        if isinstance(module, RowSwitchedLinear) and module.packed_from_rows <= 1 and module.input_major_weight is not None:
            if module.read_outside:
                kept += 1
            else:
                module.input_major_weight = None
    return kept


PROBE_ROWS = (1, 2, 4)
_PROBE_PASSES = 3


@torch.inference_mode()
def choose_packed_from_rows(linears: list[RowSwitchedLinear]) -> int:
    """The smallest of ``PROBE_ROWS`` from which oneDNN's packed kernel beat
    MKL's at every larger probe, timing one pass over all ``linears`` (their
    weights streamed from memory, as in a decode step; best of a few passes,
    the two kernels interleaved against noise); ``PACKED_FROM_ROWS`` if MKL
    won at the largest probe. A second or so at load for the default model."""
    inputs = {(rows, n): torch.randn(rows, n) for rows in PROBE_ROWS for n in {m.in_features for m in linears}}

    def pass_s(rows: int, packed: bool) -> float:
        start = time.perf_counter()
        for module in linears:
            x = inputs[rows, module.in_features]
            module.packed_forward(x) if packed else module.mkl_forward(x)
        return time.perf_counter() - start

    def best_s(rows: int) -> tuple[float, float]:
        pass_s(rows, True), pass_s(rows, False)  # warm-up: first-call allocations and oneDNN primitives
        best = {True: float("inf"), False: float("inf")}
        for _ in range(_PROBE_PASSES):
            for packed in (True, False):
                best[packed] = min(best[packed], pass_s(rows, packed))
        return best[True], best[False]

    return packed_from_rows_given(best_s)


def packed_from_rows_given(best_s: Callable[[int], tuple[float, float]]) -> int:
    """The decision of ``choose_packed_from_rows`` from ``best_s(rows) ->
    (packed_s, mkl_s)``: ``switch_rows_given`` over ``PROBE_ROWS``, else
    ``PACKED_FROM_ROWS``."""
    return switch_rows_given(PROBE_ROWS, best_s, PACKED_FROM_ROWS)


def switch_rows_given(probe_rows: tuple[int, ...], times_s: Callable[[int], tuple[float, float]], otherwise: int | float) -> int | float:
    """The row count from which the second of two kernels should run, from
    ``times_s(rows) -> (second_s, first_s)``: the smallest probe at which the
    second wins, and at every larger probe. Probes are timed from the largest
    down and probing stops at the first where the second does not win
    (smaller ones are not timed at all); ``otherwise`` when it loses at the
    largest. Shared by every kernel choice made by timing at load."""
    switch = otherwise
    for rows in sorted(probe_rows, reverse=True):
        second_s, first_s = times_s(rows)
        if second_s >= first_s:
            break
        switch = rows
    return switch


def prefer_input_major_linears(model: nn.Module) -> int:
    """Re-lay out every ``nn.Linear`` except the output embedding; returns how many."""
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear) or module is output_embedding:
                continue
            weight = module.weight
            if weight.device.type != "cpu" or weight.dim() != 2:
                continue
            module.weight = nn.Parameter(weight.t().contiguous().t(), requires_grad=False)
            count += 1
    return count


def replace_linears(model: nn.Module, make: type[nn.Module]) -> int:
    """Replace every CPU ``nn.Linear`` (LM head included) by ``make(linear)``; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, make(child))
                count += 1
    return count


def linear_weight_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def optimise_cpu_linears(model: nn.Module, dtype: torch.dtype) -> str:
    """Pick the faster layout for ``dtype`` on this CPU; returns what was done."""
    if dtype == torch.bfloat16 and has_native_bf16():
        return f"{replace_linears(model, PackedLinear)} linears packed for oneDNN (bf16)"
    if dtype == torch.float32 and torch.backends.mkldnn.is_available() and linear_weight_bytes(model) <= DUAL_LAYOUT_MAX_BYTES:
        count = replace_linears(model, RowSwitchedLinear)
        linears = [module for module in model.modules() if isinstance(module, RowSwitchedLinear)]
        packed_from = choose_packed_from_rows(linears)
        for module in linears:
            module.use_packed_from(packed_from)
        if packed_from <= 1:
            return f"{count} linears packed for oneDNN (float32; faster than MKL from one row on this CPU, measured at load)"
        return f"{count} linears kept [in, out] for < {packed_from} rows and packed for oneDNN from {packed_from} (measured at load)"
    return f"{prefer_input_major_linears(model)} linears laid out [in, out]"

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

**float32, models of up to ``PROBED_LAYOUT_MAX_BYTES`` of linears** (the
default model's 540 MB): which layout is fastest depends on the CPU and on
the row count, so ``choose_float32_layout`` times one pass over the model's
own linears (their weights streamed from memory, as in a step) at 1, 16 and
64 rows in each of three layouts: the checkpoint's ``[out, in]``, ``[in,
out]``, and packed for oneDNN. The model keeps **one** of them, the least
total time relative to the fastest at each row count: a second layout would
hold every weight twice (1.8x the weights' memory) to gain a few per cent at
some row counts (Intel with AMX, 2026-12-07: the checkpoint's layout ties
``[in, out]`` at one row and is 30 % faster than packed there, packed is 6 %
faster at 16 rows). An LM head tied to the input embedding keeps the
embedding's tensor whatever the choice, so no weight is held twice.

The measurements behind each choice, with host and date:
docs/PERFORMANCE.md, "Measurements behind choices in the code".
"""

from collections.abc import Callable

import torch
from torch import nn

from model_runtime.weights.quantization import best_seconds

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
# Above this many bytes of linears, probing (three layouts held at once) is
# not worth its memory: such models keep the [in, out] layout.
PROBED_LAYOUT_MAX_BYTES = 2 * 2**30


def has_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AMX tiles or AVX512-BF16) and oneDNN is built in."""
    return torch.backends.mkldnn.is_available() and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight prepacked for oneDNN (CPU, inference only).

    ``weight`` is the checkpoint's tensor, kept for model code that reads a
    projection's weight outside the projection (Ergo reads
    ``o_proj.weight.dtype``): a read sets ``read_outside``, and after the
    model's forward ran ``free_unread_copies`` drops it from every module
    nothing read, so the model holds each weight once (a tied LM head's
    tensor stays the input embedding's).
    """

    def __init__(self, linear: nn.Linear, packed_weight: torch.Tensor | None = None, rows_hint: int = _PACKING_ROWS_HINT) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.read_outside = False
        with torch.no_grad():
            weight = linear.weight.detach()
            if packed_weight is None:
                packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_hint)
        self.register_buffer("packed_weight", packed_weight, persistent=False)
        self.register_buffer("checkpoint_weight", weight, persistent=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor | None:
        self.read_outside = True
        return self.checkpoint_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


def free_unread_copies(model: nn.Module) -> int:
    """Drop the checkpoint weight of every ``PackedLinear`` whose weight
    nothing read from outside (run the model's forward first); returns how
    many stay for such reads."""
    kept = 0
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.checkpoint_weight is not None:
            if module.read_outside:
                # its own memory: a view of the checkpoint's mapping keeps every page the load touched resident
                module.checkpoint_weight = module.checkpoint_weight.clone()
                kept += 1
            else:
                module.checkpoint_weight = None
    return kept


CHECKPOINT, INPUT_MAJOR, PACKED = "the checkpoint's [out, in]", "[in, out]", "packed for oneDNN"
FLOAT32_LAYOUTS = (CHECKPOINT, INPUT_MAJOR, PACKED)  # ties go to the earlier: fewer copies made at load
LAYOUT_PROBE_ROWS = (1, 16, 64)


def choose_float32_layout(model: nn.Module) -> str:
    """Lay every float32 CPU linear of ``model`` out in the one layout of
    ``FLOAT32_LAYOUTS`` that ran fastest over the row counts of
    ``LAYOUT_PROBE_ROWS`` on this CPU (``fastest_overall``); returns what
    was done, with the times, for the start log. About two seconds for the
    default model, three copies of the weights held while it runs."""
    linears = cpu_linears(model)
    tied = tied_output_embedding(model)
    weights = {
        CHECKPOINT: [m.weight.detach() for m in linears],
        INPUT_MAJOR: [m.weight.detach() if m is tied else m.weight.detach().t().contiguous().t() for m in linears],
        PACKED: [
            m.weight.detach()
            if m is tied
            else torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().contiguous(), _FLOAT32_PACKING_ROWS_HINT)
            for m in linears
        ],
    }
    times_s = time_layouts(linears, lambda layout, m, i, x: _layout_forward(layout, m is tied)(x, weights[layout][i], m.bias))
    layout = fastest_overall(times_s)
    with torch.no_grad():
        for module, weight in zip(linears, weights[layout]):
            if layout == INPUT_MAJOR and module is not tied:
                module.weight = nn.Parameter(weight, requires_grad=False)
    if layout == PACKED:
        packed = {id(m): w for m, w in zip(linears, weights[PACKED]) if m is not tied}
        replace_linears(model, lambda linear: PackedLinear(linear, packed[id(linear)]), lambda linear: id(linear) in packed)
    measured = "; ".join(
        f"{name} {' / '.join(f'{times_s[name][rows] * 1e3:.1f}' for rows in LAYOUT_PROBE_ROWS)} ms" for name in FLOAT32_LAYOUTS
    )
    head = ", the LM head keeps the tied input embedding's" if tied is not None else ""
    return (
        f"{len(linears)} linears {layout}{head} (float32: the fastest of three layouts on this CPU, one pass at "
        f"{' / '.join(map(str, LAYOUT_PROBE_ROWS))} rows measured at load: {measured})"
    )


def _layout_forward(layout: str, is_tied_head: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    return packed_linear if layout == PACKED and not is_tied_head else nn.functional.linear


@torch.inference_mode()
def time_layouts(linears: list[nn.Linear], forward: Callable[[str, nn.Linear, int, torch.Tensor], object]) -> dict[str, dict[int, float]]:
    """Seconds of one pass of ``forward(layout, linear, index, x)`` over
    ``linears`` per layout and probe row count (``best_seconds``: the best of
    a few passes after a warm-up); the layouts of one row count are timed
    one after another, against drift."""
    inputs = {(rows, n): torch.randn(rows, n) for rows in LAYOUT_PROBE_ROWS for n in {m.in_features for m in linears}}

    def one_pass(layout: str, rows: int) -> Callable[[], object]:
        return lambda: [forward(layout, module, index, inputs[rows, module.in_features]) for index, module in enumerate(linears)]

    by_rows = {rows: {layout: best_seconds(one_pass(layout, rows)) for layout in FLOAT32_LAYOUTS} for rows in LAYOUT_PROBE_ROWS}
    return {layout: {rows: by_rows[rows][layout] for rows in LAYOUT_PROBE_ROWS} for layout in FLOAT32_LAYOUTS}


def fastest_overall(times_s: dict[str, dict[int, float]]) -> str:
    """The layout whose times, each divided by the fastest layout's at the
    same row count, sum least: every row count weighs alike, whatever its
    absolute time (a 64-row pass takes 4x a one-row pass). Ties go to the
    earlier layout of ``times_s``."""
    fastest = {rows: min(layout_s[rows] for layout_s in times_s.values()) for rows in next(iter(times_s.values()))}
    return min(times_s, key=lambda layout: sum(seconds / fastest[rows] for rows, seconds in times_s[layout].items()))


def cpu_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.dim() == 2]


def tied_output_embedding(model: nn.Module) -> nn.Linear | None:
    """The LM head, where it shares its weight with the input embedding."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return None
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, nn.Linear) and embedding is not None and head.weight.data_ptr() == embedding.weight.data_ptr():
        return head
    return None


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


def replace_linears(
    model: nn.Module, make: Callable[[nn.Linear], nn.Module], which: Callable[[nn.Linear], bool] = lambda linear: True
) -> int:
    """Replace every CPU ``nn.Linear`` (LM head included) that ``which``
    accepts by ``make(linear)``; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu" and which(child):
                setattr(parent, name, make(child))
                count += 1
    return count


def linear_weight_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def optimise_cpu_linears(model: nn.Module, dtype: torch.dtype) -> str:
    """Pick the faster layout for ``dtype`` on this CPU; returns what was done."""
    if dtype == torch.bfloat16 and has_native_bf16():
        return f"{replace_linears(model, PackedLinear)} linears packed for oneDNN (bf16)"
    if dtype == torch.float32 and torch.backends.mkldnn.is_available() and linear_weight_bytes(model) <= PROBED_LAYOUT_MAX_BYTES:
        return choose_float32_layout(model)
    return f"{prefer_input_major_linears(model)} linears laid out [in, out]"

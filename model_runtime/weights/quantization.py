"""Weight-only int8 linears (``--quantization int8``, CPU, float32 activations).

Each linear weight (``nn.Linear``, GPT-2's ``Conv1D``), the LM head's
included, is stored as int8 in groups of ``GROUP`` = 32 weights along a row,
each group with its own float32 scale and offset (asymmetric: the group's
min..max range in 256 steps, ``w ~= q * scale + offset``); the activations,
the bias, the embedding lookups and everything outside the linears stay
float32. A decode step is bound by the bytes of weights it reads (540 MB in
float32 for the default model); this is 1.25 bytes a weight instead of 4.

Why groups of 32 and not one scale per output channel: on the default model
per-channel int8 agreed with float32 on only 95 % of teacher-forced top-1
tokens, groups of 32 on 99.5 % (its weights come from a GGUF file of 4-bit
blocks of 32, each with its own range). docs/PERFORMANCE.md, "int8 weights".

The product runs in tokenstep's own kernel (``model_runtime/kernels``:
``torch.ops.tokenstep.int8_linear``), which dequantizes weight vectors in
registers (a few rows) or a few weight rows at a time into L1 (more rows), so
each weight byte is read from memory once per step. When the model loads,
``choose_kernels`` measures on this CPU which instruction-set build of it
is fastest and from which row count (a long prefill) dequantizing the whole
weight for torch's GEMM beats it. Without the kernels (no compiler, or
``TOKENSTEP_NO_KERNELS=1``) the loader serves float32 linears of the same
values instead (``to_float_linears``): float32's memory and speed.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from model_runtime import kernels

logger = logging.getLogger(__name__)

INT8_MAX = 127
GROUP = 32  # weights per (scale, offset); the kernel's GROUP
# Row counts probed for the kernel/GEMM switch: decode steps, a decode step
# beside a prefill chunk, a prefill.
SWITCH_PROBE_ROWS = (32, 64, 128, 256)
ISA_PROBE_ROWS = (1, 16)
_PROBE_PASSES = 3
_CLEARLY_SLOWER = 2.0  # best_seconds_each
_SCREEN_LINEARS = 8  # best_seconds_each's screens: about one decoder layer's linears


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` [N, K] as int8 ``q`` [N, K] and float32 ``scales``,
    ``offsets`` [N, ceil(K / GROUP)], each group of ``GROUP`` weights of a row
    mapped onto its own min..max range: ``w = q * scale + offset`` to within
    ``scale / 2`` (a constant group is exact, with scale 1)."""
    weight = weight.detach().float()
    n, k = weight.shape
    groups = -(-k // GROUP)
    padded = nn.functional.pad(weight, (0, groups * GROUP - k), value=0.0) if k % GROUP else weight
    grouped = padded.reshape(n, groups, GROUP)
    low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    scales = (high - low) / (2 * INT8_MAX + 1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    steps = torch.round((grouped - low[..., None]) / scales[..., None]).clamp_(0, 2 * INT8_MAX + 1)
    q = (steps - (INT8_MAX + 1)).to(torch.int8).reshape(n, groups * GROUP)[:, :k]
    offsets = low + (INT8_MAX + 1) * scales  # so that q * scale + offset = low + steps * scale
    return q.contiguous(), scales.contiguous(), offsets.contiguous()


def group_size(in_features: int, groups: int) -> int:
    """Weights per (scale, offset) of a row of ``in_features`` with ``groups``
    of them: ``GROUP``, or 16 (GGUF's Q6_K, int8 only) where the scales say so
    (the kernels' ``check_weight`` reads them the same way)."""
    if in_features % 16 == 0 and groups == in_features // 16 and groups != -(-in_features // GROUP):
        return 16
    return GROUP


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    index = torch.arange(k, device=q.device) // group_size(k, scales.shape[1])
    return q.to(torch.float32).mul_(scales[:, index]).add_(offsets[:, index])


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """4-bit weights packed [N, K / 2] in GGUF's Q4 order (byte i of each
    group of 32 holds weight i in its low nibble, weight i + 16 in its high
    one) as uint8 values 0..15 [N, K]."""
    n, half = packed.shape
    groups = packed.reshape(n, half // (GROUP // 2), GROUP // 2)
    return torch.cat((groups & 15, groups >> 4), dim=2).reshape(n, 2 * half)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """The inverse of ``unpack_nibbles``: values 0..15 [N, K] (K a multiple of 32) packed [N, K / 2]."""
    n, k = values.shape
    groups = values.to(torch.uint8).reshape(n, k // GROUP, 2, GROUP // 2)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


class GroupwiseLinear(nn.Module):
    """``nn.Linear`` with a quantized weight ``q``, a float32 scale and offset
    per group of 32 weights along a row (``w = q * scale + offset``; inference
    only). Subclasses say how ``q`` is stored and which kernel ops read it.

    Inputs of fewer than ``gemm_from_rows`` rows go to the kernel
    (instruction set ``isa``, an index into ``ops.isas()``); larger ones, or
    any input when ``ops`` is None, to torch's GEMM over the dequantized weight.
    """

    def __init__(
        self, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None, ops: object | None, in_features: int
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape[0], in_features
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scales", scales.float().contiguous(), persistent=False)
        self.register_buffer("offsets", offsets.float().contiguous(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
        self.ops = ops
        self.isa = -1
        self.gemm_from_rows = float("inf") if ops is not None else 0

    @property
    def group(self) -> int:
        return group_size(self.in_features, self.scales.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is None:
            return self.gemm_forward(x)
        # The op itself switches to dequantize + GEMM from gemm_from_rows rows.
        gemm_from_rows = 0 if self.gemm_from_rows == float("inf") else int(self.gemm_from_rows)
        return self.kernel_forward(x, gemm_from_rows=gemm_from_rows)

    def gemm_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(), self.bias)

    def kernel_forward(self, x: torch.Tensor, isa: int | None = None, gemm_from_rows: int = 0) -> torch.Tensor:
        """The kernel (``gemm_from_rows`` 0) or, from that many rows on, the op's own dequantize + GEMM."""
        linear = getattr(self.ops, f"{self.KIND}_linear")
        return linear(x, self.q, self.scales, self.offsets, self.bias, self.isa if isa is None else isa, gemm_from_rows)

    def dequantized(self) -> torch.Tensor:
        if self.ops is not None:
            return getattr(self.ops, f"{self.KIND}_dequantize")(self.q, self.scales, self.offsets, self.isa)
        return dequantize_groups(self.values(), self.scales, self.offsets)


class Int8Linear(GroupwiseLinear):
    """One int8 a weight (``q`` [out, in])."""

    KIND = "int8"

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, ops: object | None) -> "Int8Linear":
        """From a float ``weight`` [out, in] as ``nn.Linear`` holds it (``quantize_groups``)."""
        return cls(*quantize_groups(weight), bias, ops, weight.shape[1])

    def values(self) -> torch.Tensor:
        return self.q


class Int4Linear(GroupwiseLinear):
    """Two 4-bit weights (0..15) a byte, ``q`` [out, in / 2] in GGUF's Q4
    order (``pack_nibbles``); ``in`` is a multiple of 32."""

    KIND = "int4"

    def values(self) -> torch.Tensor:
        return unpack_nibbles(self.q)


def replace_groupwise(
    model: nn.Module, make: Callable[[GroupwiseLinear], nn.Module], which: Callable[[GroupwiseLinear], bool] = lambda _: True
) -> list[nn.Module]:
    """Replace every ``GroupwiseLinear`` of ``model`` that ``which`` accepts by ``make(it)``; returns the new modules."""
    made = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GroupwiseLinear) and which(child):
                made.append(make(child))
                setattr(parent, name, made[-1])
    return made


def to_float_linears(model: nn.Module) -> int:
    """Replace every ``GroupwiseLinear`` of ``model`` by a float32
    ``nn.Linear`` holding its dequantized weight (the same values); returns
    how many. Without tokenstep's kernels that is what serves a quantized
    model at float32's speed, in float32's memory."""

    def float_linear(module: GroupwiseLinear) -> nn.Linear:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = nn.Parameter(module.dequantized(), requires_grad=False)
        linear.bias = module.bias
        return linear

    with torch.no_grad():
        return len(replace_groupwise(model, float_linear))


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``[out, in]`` weight of a CPU linear layer (``Conv1D`` stores ``[in, out]``), else None."""
    if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
        return module.weight
    if isinstance(module, Conv1D) and module.weight.device.type == "cpu":
        return module.weight.t()
    return None


def quantize_int8(model: nn.Module, include_lm_head: bool = True) -> list[GroupwiseLinear]:
    """Replace every CPU linear layer of ``model`` (the LM head too, unless
    ``include_lm_head`` is False) by an ``Int8Linear`` and return them (their
    kernels still to be chosen: ``choose_groupwise_kernels``). A tied input
    embedding keeps its float32 weight for lookups."""
    ops = kernels.load()
    head = model.get_output_embeddings()

    def int8(name: str, module: nn.Module, weight: torch.Tensor) -> Int8Linear | None:
        return None if module is head and not include_lm_head else Int8Linear.quantize(weight, module.bias, ops)

    return replace_linears(model, int8)


Replacement = Callable[[str, nn.Module, torch.Tensor], GroupwiseLinear | None]


def replace_linears(model: nn.Module, replacement: Replacement) -> list[GroupwiseLinear]:
    """Replace each CPU linear layer of ``model`` for which ``replacement(qualified
    name, module, weight [out, in])`` returns a module; return the new modules.
    Their kernels are chosen once the loader knows which of them keep float
    activations (``choose_groupwise_kernels``); until then each runs the
    first instruction set's kernel at every row count."""
    quantized = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            weight = linear_weight(child)
            module = None if weight is None else replacement(f"{parent_name}.{name}".lstrip("."), child, weight)
            if module is not None:
                setattr(parent, name, module)
                quantized.append(module)
    return quantized


def choose_groupwise_kernels(model: nn.Module, ops: object | None) -> list[GroupwiseLinear]:
    """Choose by measurement (``choose_kernels``) the kernels of every
    ``GroupwiseLinear`` still in ``model``, i.e. those whose activations stay
    float32 (integer activations run other kernels, timed on their own), and
    return them. About a second of every start, so never for linears that
    integer activations replace."""
    linears = [module for module in model.modules() if isinstance(module, GroupwiseLinear)]
    if ops is not None and linears:
        head = model.get_output_embeddings()
        isa, gemm_from_rows = choose_kernels(linears, ops, next((m for m in linears if m is head), None))
        for module in linears:
            module.isa = isa
            module.gemm_from_rows = gemm_from_rows.get(shape_key(module), float("inf"))
    return linears


def shape_key(module: GroupwiseLinear) -> tuple[str, int, int]:
    return module.KIND, module.in_features, module.out_features


def describe(linears: list[GroupwiseLinear], chosen: list[GroupwiseLinear]) -> str:
    """The quantized ``linears`` counted by kind, and the kernels measured for
    ``chosen``, those of them that serve float32 activations."""
    if not linears:
        return "no linears quantized"
    kinds = Counter(m.KIND for m in linears)
    counts = " + ".join(f"{count} linears {kind}" for kind, count in kinds.items())
    if not chosen:
        return counts
    switches = sorted({m.gemm_from_rows for m in chosen if m.gemm_from_rows != float("inf")})
    switch = f"; torch GEMM on the dequantized weight from {'/'.join(map(str, switches))} rows" if switches else ""
    which = "" if len(chosen) == len(linears) else f"{len(chosen)} of them on the "
    return f"{counts} ({which}{chosen[0].ops.isas()[chosen[0].isa]} kernel{switch}; measured at load)"


def best_seconds(run: Callable[[], object], passes: int = _PROBE_PASSES, warm_up: bool = True) -> float:
    """The fastest of a few timed calls of ``run``, after one untimed warm-up."""
    if warm_up:
        run()
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def best_seconds_each(runs: dict[int, Callable[[], object]], screens: dict[int, Callable[[], object]] | None = None) -> dict[int, float]:
    """``best_seconds`` of each run (one per instruction set), except that a
    run whose first timed call took over ``_CLEARLY_SLOWER`` times the
    fastest first call is timed no further: it cannot win (noise here is far
    below that), and the generic build's passes cost seconds at every start.
    With ``screens`` (each run's work over a few of its linears), a run whose
    screen is that much slower than the fastest screen is not run at all
    (infinity): a second of the generic build's warm-up and pass saved."""
    if screens:
        screen_s = {key: best_seconds(screens[key], passes=1) for key in runs}
        cutoff = _CLEARLY_SLOWER * min(screen_s.values())
        screened_out = {key: float("inf") for key in runs if screen_s[key] > cutoff}
        return {**screened_out, **best_seconds_each({key: run for key, run in runs.items() if key not in screened_out})}
    first = {key: best_seconds(run, passes=1) for key, run in runs.items()}
    cutoff = _CLEARLY_SLOWER * min(first.values())
    return {
        key: min(first[key], best_seconds(run, _PROBE_PASSES - 1, warm_up=False)) if first[key] <= cutoff else first[key]
        for key, run in runs.items()
    }


def screen_of(linears: list, pass_over: Callable[[list], Callable[[], object]]) -> Callable[[], object]:
    """``pass_over`` a few of ``linears`` (about one decoder layer's): a screen for ``best_seconds_each``."""
    return pass_over(linears[: max(1, min(len(linears), _SCREEN_LINEARS))])


def timings_text(seconds: dict[int, float], names: list[str]) -> dict[str, str]:
    """Per instruction set, for the start log: its time, or that a screen ruled it out."""
    return {names[i]: f"{s * 1e3:.1f} ms" if s != float("inf") else "ruled out on a few linears" for i, s in seconds.items()}


@torch.inference_mode()
def choose_kernels(
    linears: list[GroupwiseLinear], ops: object, lm_head: GroupwiseLinear | None = None
) -> tuple[int, dict[tuple[str, int, int], int | float]]:
    """(isa, gemm_from_rows per ``shape_key``) for this CPU, by timing: the
    instruction set whose kernel passes fastest over all ``linears`` at
    ``ISA_PROBE_ROWS`` (weights streamed from memory, as in a decode step),
    then for each distinct shape the row count from which torch's GEMM on the
    dequantized weight wins, at ``SWITCH_PROBE_ROWS`` (compute-bound there, so
    one layer's shapes tell). The LM head keeps the kernel: it sees only the
    sampled rows, never a prefill. About a second for the default model."""
    isas = list(range(len(ops.isas())))
    inputs = {(rows, k): torch.randn(rows, k) for rows in {*ISA_PROBE_ROWS, *SWITCH_PROBE_ROWS} for k in {m.in_features for m in linears}}
    best_s = best_seconds

    def kernel_pass(isa: int, over: list[GroupwiseLinear] = linears) -> Callable[[], None]:
        return lambda: [m.kernel_forward(inputs[rows, m.in_features], isa) for rows in ISA_PROBE_ROWS for m in over]

    screens = {isa: screen_of(linears, lambda few, isa=isa: kernel_pass(isa, few)) for isa in isas}
    isa_s = best_seconds_each({isa: kernel_pass(isa) for isa in isas}, screens)
    isa = min(isa_s, key=isa_s.get)
    logger.info("quantized kernels per instruction set, one pass at rows %s: %s", ISA_PROBE_ROWS, timings_text(isa_s, ops.isas()))
    shapes = {shape_key(m): m for m in linears if m is not lm_head}
    decisions = {}
    for shape, module in shapes.items():
        module.isa = isa

        def switch_s(rows: int, module: GroupwiseLinear = module) -> tuple[float, float]:
            x = inputs[rows, module.in_features]
            return best_s(lambda: module.kernel_forward(x, isa)), best_s(lambda: module.gemm_forward(x))

        decisions[shape] = gemm_from_rows_given(switch_s)
    return isa, decisions


def gemm_from_rows_given(switch_s: Callable[[int], tuple[float, float]]) -> int | float:
    """The decision of ``choose_kernels`` from ``switch_s(rows) ->
    (kernel_s, gemm_s)``: the smallest of ``SWITCH_PROBE_ROWS`` from which
    torch's GEMM wins at it and every larger probe, infinity when the kernel
    wins at the largest. Probes are timed from the largest down and probing
    stops at the first where the GEMM does not win (smaller ones are not
    timed at all)."""
    gemm_from_rows = float("inf")
    for rows in sorted(SWITCH_PROBE_ROWS, reverse=True):
        kernel_s, gemm_s = switch_s(rows)
        if gemm_s >= kernel_s:
            break
        gemm_from_rows = rows
    return gemm_from_rows

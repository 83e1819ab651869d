"""``--activations int16`` / ``int8``: quantized linears that quantize their input too.

With ``--quantization gguf`` or ``int8`` the weights are already integer
codes in groups of 32 with a scale and offset each. These modes also round
each group of 32 activations of a row to a signed integer of 16 or 8 bits
with its own scale (symmetric, ``max|x| / 32767`` or ``/ 127``), so the inner
product of a group is an exact integer sum (AVX-512 VNNI: ``vpdpwssd``, 32
products an instruction, or ``vpdpbusd``, 64) and only two float
multiply-adds per group remain (``model_runtime/kernels/int_gemm.cpp`` has the
algebra). A decode step reads each weight in its 4 or 8 bits (5-bit codes,
GGUF's Q5_0 / Q5_1 / Q5_K, in 6: three pairs of them to a 32-bit word) and
does almost no float work per weight.

Both change the numbers: outputs are no longer exactly those of the float
model the codes dequantize to. int16 rounds each activation to within
1/65534 of its group's largest, and stays very close to it; int8 is what
llama.cpp does for its Q4/Q8 dot products and moves more
(docs/PERFORMANCE.md has the measured agreement of both). Each row's result
is independent of the other rows of its step, so batching does not change
what a request gets. Without tokenstep's kernels (no compiler) the modes are
unavailable: the loader warns and serves float32 linears of the same weights.

The weights are repacked at load into the kernel's layout (``pack_codes``):
tiles of 16 output channels, per group blocks of 16 channels x 4 codes (int8
activations) or 32-bit words of code pairs (int16; projections of mixed code
widths, e.g. 5-bit queries and keys beside an 8-bit value, are widened to 8 bits
to share one call), scales and
offsets as float16 (GGUF's
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 store theirs in float16, so those are exact; a
K-quant's ``d * sc`` and ``dmin * mn`` are rounded to float16, which moves a
linear's output by up to about 8e-4 of its largest on the tests' tiny model,
against 3e-5 for the exact ones).
"""

import logging
from collections.abc import Callable

import torch
from torch import nn

from model_runtime.weights.quantization import (
    GROUP,
    GroupwiseLinear,
    Int4Linear,
    Int8Linear,
    best_seconds_each,
    replace_groupwise,
    screen_of,
    timings_text,
    unpack_nibbles,
)

logger = logging.getLogger(__name__)

TILE = 16  # output channels per tile (int_gemm.cpp: TILE)
_PROBE_ROWS = (1, 16)


def pack_codes(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int, act_bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unsigned ``codes`` [N, K] (below ``2**bits``) with float ``scales`` and
    ``offsets`` [N, ceil(K / 32)] (``w = scale * code + offset``) in the
    kernel's layout for ``act_bits`` activations (int_gemm.cpp describes
    both): codes uint8 [tiles, groups, 512, 384 or 256 bytes for 8, 5 or 4
    bits] (``code_layout``), scales and offsets float16 [tiles, groups, 16].
    Channels and codes past N and K are zero (a zero activation meets them)."""
    n, k = codes.shape
    groups, tiles = -(-k // GROUP), -(-n // TILE)

    def per_tile(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(tiles * TILE, groups, dtype=torch.float32)
        out[:n] = values
        return out.reshape(tiles, TILE, groups).permute(0, 2, 1).to(torch.float16).contiguous()

    return code_layout(codes, bits, act_bits), per_tile(scales), per_tile(offsets)


def code_layout(codes: torch.Tensor, bits: int, act_bits: int) -> torch.Tensor:
    """``pack_codes``' codes."""
    n, k = codes.shape
    groups, tiles = -(-k // GROUP), -(-n // TILE)
    padded = torch.zeros(tiles * TILE, groups * GROUP, dtype=torch.uint8)
    padded[:n, :k] = codes
    if act_bits == 16:
        # [tile, channel, group, word, pair, half] -> [tile, group, word, channel, half, pair]: 32-bit words of E
        # pairs, pair e in bits [bits e, bits (e + 1)) of each 16-bit half, the halves codes k = 2 (E w + e) and
        # k + 1; a last word with fewer than E pairs (5-bit codes: 3 a word, 16 a group) is zero past them
        pairs = 16 // bits
        words = -(-GROUP // 2 // pairs)
        halves = torch.zeros(tiles * TILE, groups, words * pairs, 2, dtype=torch.int32)
        halves[:, :, : GROUP // 2] = padded.reshape(tiles * TILE, groups, GROUP // 2, 2)
        lanes = halves.reshape(tiles, TILE, groups, words, pairs, 2).permute(0, 2, 3, 1, 5, 4)
        half = sum(lanes[..., e] << (bits * e) for e in range(pairs))  # [tile, group, word, channel, half] < 2**16
        packed = torch.stack([half & 255, half >> 8], -1).to(torch.uint8).reshape(tiles, groups, -1).contiguous()
    else:
        per_lane = 32 // act_bits  # codes of one channel in a block: one lane of the dot instruction
        # [tile, channel, group, block, code] -> [tile, group, block, channel, code]
        blocks = padded.reshape(tiles, TILE, groups, GROUP // per_lane, per_lane).permute(0, 2, 3, 1, 4)
        blocks = blocks.reshape(tiles, groups, GROUP // per_lane, TILE * per_lane)
        if bits == 4:  # blocks 2j and 2j + 1 share one: low nibbles, high nibbles
            blocks = blocks[:, :, 0::2] | (blocks[:, :, 1::2] << 4)
        packed = blocks.reshape(tiles, groups, -1).contiguous()
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """The inverse of ``code_layout`` for int16 activations: codes uint8 [n, k]."""
    tiles, groups = packed.shape[:2]
    pairs = 16 // bits
    words = -(-GROUP // 2 // pairs)
    halves = packed.reshape(tiles, groups, words, TILE, 2, 2).to(torch.int32)  # [tile, group, word, channel, half, byte]
    half = halves[..., 0] | (halves[..., 1] << 8)
    lanes = torch.stack([(half >> (bits * e)) & (2**bits - 1) for e in range(pairs)], -1)  # [..., channel, half, pair]
    codes = lanes.permute(0, 3, 1, 2, 5, 4).reshape(tiles * TILE, groups, words * pairs * 2)[:, :, :GROUP]
    return codes.reshape(tiles * TILE, groups * GROUP)[:n, :k].to(torch.uint8).contiguous()


class IntActivationLinear(nn.Module):
    """A quantized linear whose input is quantized per group of 32 too, to
    ``act_bits`` (16 or 8) bits (``tokenstep::int_linear``); built from an
    ``Int4Linear`` or ``Int8Linear``."""

    def __init__(self, source: GroupwiseLinear, ops: object, act_bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act_bits = source.in_features, source.out_features, act_bits
        if isinstance(source, Int4Linear):
            self.bits, codes, offsets = 4, unpack_nibbles(source.q), source.offsets
        elif isinstance(source, Int8Linear):
            # int8 q as unsigned codes q + shift: w = s q + o = s (q + shift) + (o - shift s). q in -16..15 or
            # 0..31 (GGUF's Q5_0; Q5_1, Q5_K) are 5-bit codes for int16 activations (6 bits a weight in memory,
            # not 8); otherwise q in -128..127 as q + 128, or as they are where never negative, keeping the
            # offset off a large sum
            low, high = source.q.min().item(), source.q.max().item()
            shift = 0 if low >= 0 else 16
            if act_bits == 16 and low + shift >= 0 and high + shift < 32:
                self.bits = 5
            else:
                self.bits, shift = 8, 0 if low >= 0 else 128
            codes = (source.q.to(torch.int16) + shift).to(torch.uint8)
            offsets = source.offsets - shift * source.scales
        else:
            raise TypeError(f"no int8-activation form of {type(source).__name__}")
        codes, scales, offsets = pack_codes(codes, source.scales, offsets, self.bits, act_bits)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        self.bias = source.bias
        self.ops = ops
        self.isa = -1

    def widen(self) -> None:
        """4- or 5-bit codes (int16 activations) as 8-bit ones, the same codes, scales and offsets: every
        output the same to the bit, for a projection that shares a call with 8-bit ones (``side_by_side``)."""
        assert self.bits in (4, 5) and self.act_bits == 16
        codes = unpack_codes(self._buffers["codes"], self.bits, self.out_features, self.in_features)
        self._buffers["codes"] = code_layout(codes, 8, 16)
        self.bits = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.isa)

    def run(self, x: torch.Tensor, isa: int) -> torch.Tensor:
        # Straight from the dicts nn.Module keeps them in: its __getattr__ is a Python call per tensor.
        buffers = self._buffers
        bias = self._parameters.get("bias")
        return self.ops.int_linear(
            x, buffers["codes"], buffers["scales"], buffers["offsets"], bias, self.bits, self.act_bits, self.out_features, isa
        )

    # The op without nn.Module.__call__'s hook machinery: at one row a call of
    # this module is a few microseconds of kernel, and the machinery (hooks are
    # never registered on these modules) cost ~1.5 ms of a 16 ms decode step
    # over the default model's 211 linears.
    __call__ = forward

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, act_bits={self.act_bits}"


@torch.inference_mode()
def side_by_side(linears: list[nn.Module]) -> IntActivationLinear | None:
    """One ``IntActivationLinear`` whose outputs are ``linears``' outputs
    side by side, for linears that read the same input (a layer's query, key
    and value projections; its gate and up projections): one call where
    there were two or three, so the input is quantized once and the threads
    forked once (a one-row call is a few microseconds of kernel beside about
    as much of call overhead). The linears' buffers become views of the
    merged ones, so nothing is held twice. None unless all are
    ``IntActivationLinear`` of one input size, bit widths, instruction set and
    kernels, each of whole tiles of outputs, biased alike, and the merged one
    gives every output to the bit on random rows. Int16-activation codes of
    mixed widths (GGUF's Q4_K_M: Q5_0 queries and keys, a Q8_0 value in some
    layers) are all widened to 8 bits first."""
    if len(linears) < 2 or not all(type(m) is IntActivationLinear for m in linears):
        return None
    first = linears[0]
    mixed = len({m.bits for m in linears}) > 1 and all(m.act_bits == 16 for m in linears)
    if any(
        (m.in_features, 8 if mixed else m.bits, m.act_bits, m.isa, m.ops)
        != (first.in_features, 8 if mixed else first.bits, first.act_bits, first.isa, first.ops)
        or m.out_features % TILE
        or (m.bias is None) != (first.bias is None)
        for m in linears
    ):
        return None
    for m in linears:
        if m.bits != 8 and mixed:
            m.widen()
    merged = IntActivationLinear.__new__(IntActivationLinear)
    nn.Module.__init__(merged)
    merged.in_features, merged.bits, merged.act_bits, merged.ops, merged.isa = (
        first.in_features,
        first.bits,
        first.act_bits,
        first.ops,
        first.isa,
    )
    merged.out_features = sum(m.out_features for m in linears)
    merged.split_sizes = [m.out_features for m in linears]
    for name in ("codes", "scales", "offsets"):  # [tiles, groups, ...]: tiles of 16 outputs, each linear's whole
        merged.register_buffer(name, torch.cat([m._buffers[name] for m in linears]), persistent=False)
    merged.bias = None if first.bias is None else nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    x = torch.randn(3, first.in_features, generator=torch.Generator().manual_seed(0)) * 4
    if not all(torch.equal(merged(rows), torch.cat([m(rows) for m in linears], -1)) for rows in (x[:1], x)):
        return None
    start = 0
    for m in linears:
        tiles = m.out_features // TILE
        for name in ("codes", "scales", "offsets"):
            m._buffers[name] = merged._buffers[name][start : start + tiles]
        if m.bias is not None:
            m.bias = nn.Parameter(merged.bias.detach()[start * TILE : start * TILE + m.out_features], requires_grad=False)
        start += tiles
    return merged


def quantize_activations(model: nn.Module, ops: object, activations: str) -> list[IntActivationLinear]:
    """Replace every ``GroupwiseLinear`` of ``model`` by an
    ``IntActivationLinear`` for ``activations`` ("int16" or "int8") on
    tokenstep's kernels ``ops`` and choose the instruction set by timing.
    (Without kernels the loader serves float32 linears instead.)"""
    act_bits = {"int16": 16, "int8": 8}[activations]
    # Groups of 16 (GGUF's Q6_K) keep float activations: the integer kernel's groups are 32.
    replaced = replace_groupwise(model, lambda module: IntActivationLinear(module, ops, act_bits), lambda module: module.group == GROUP)
    if replaced:
        isa = choose_isa(replaced, ops)
        for module in replaced:
            module.isa = isa
    return replaced


@torch.inference_mode()
def choose_isa(linears: list[IntActivationLinear], ops: object) -> int:
    """The instruction-set build whose kernel passes fastest over ``linears``
    at ``_PROBE_ROWS`` rows (each one's best of a few passes)."""
    inputs = {(rows, k): torch.randn(rows, k) for rows in _PROBE_ROWS for k in {m.in_features for m in linears}}

    def one_pass(isa: int, over: list[IntActivationLinear] = linears) -> Callable[[], None]:
        return lambda: [m.run(inputs[rows, m.in_features], isa) for rows in _PROBE_ROWS for m in over]

    isas = range(len(ops.isas()))
    screens = {isa: screen_of(linears, lambda few, isa=isa: one_pass(isa, few)) for isa in isas}
    seconds = best_seconds_each({isa: one_pass(isa) for isa in isas}, screens)
    logger.info("integer-activation kernels per instruction set, one pass at rows %s: %s", _PROBE_ROWS, timings_text(seconds, ops.isas()))
    return min(seconds, key=seconds.get)

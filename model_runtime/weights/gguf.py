"""``--quantization gguf``: a GGUF checkpoint's quantized linears served as the file stores them.

Every block format served here comes down to groups of 32 weights of a row,
each ``w = q * scale + offset`` with a small integer ``q``: exactly a group of
``model_runtime.weights.quantization``, with float32 scale and offset.

- ``Q4_1``: a float16 scale ``d``, a float16 minimum ``m`` and 16 bytes of
  nibbles, ``w = q * d + m`` with ``q`` in 0..15: an ``Int4Linear`` with scale
  ``d`` and offset ``m``;
- ``Q4_0``: ``d`` and 16 bytes, ``w = (q - 8) * d``: offset ``-8 d``;
- ``Q8_0``: ``d`` and 32 int8, ``w = q * d``: an ``Int8Linear`` with offset 0;
- ``Q5_0`` / ``Q5_1``: as Q4_0 / Q4_1 with a fifth bit per weight (32 bits
  ``qh`` beside the nibbles): ``q - 16`` (0..31 for Q5_1) held in an
  ``Int8Linear``;
- the K-quants ``Q4_K`` / ``Q5_K``: super-blocks of 256 weights, eight groups
  of 32, a float16 ``d`` and ``dmin`` for the super-block and a 6-bit scale
  ``sc`` and minimum ``mn`` per group (twelve bytes hold the sixteen),
  ``w = q * (d * sc) - dmin * mn``: scale ``d * sc`` and offset
  ``-dmin * mn``, both exact in float32 (an 11-bit significand times a 6-bit
  integer). Q4_K's nibbles hold group 2j in the low halves of 32 bytes and
  group 2j + 1 in the high ones; they are regrouped into Q4_0's order (byte i:
  weight i low, weight i + 16 high) for ``Int4Linear``. Q5_K adds bit j of
  byte i of a 32-byte ``qh`` as the fifth bit of group j's weight i, and is
  held in an ``Int8Linear``;
- ``Q6_K``: super-blocks of 256 weights of 6 bits (four in the low and
  high nibbles of 128 bytes, two in 64 bytes of bit pairs), a signed int8
  scale per 16 weights and a float16 ``d`` at the end, ``w = (q - 32) * d *
  sc``: an ``Int8Linear`` in groups of 16 (the int8 kernel takes scales
  [N, K / 16] too), offset 0.

The 4-bit nibbles keep two weights a byte (the kernel reads Q4_0's order);
the 5- and 6-bit formats take a byte a weight (1.45x and 1.2x the file's
bits, a quarter of float32). The values served are the file's, not a
re-quantization of them. Other tensor types (float, Q2_K, Q3_K, IQ*, ...)
stay as transformers dequantized them, as float32.

Which module a GGUF tensor belongs to is transformers' own mapping
(``get_gguf_hf_weights_map`` and the architecture's ``TensorProcessor``).
llama.cpp stores Llama's q/k projections with their rows permuted; the
processor's reordering of a column of row numbers gives that permutation,
which moves whole rows of blocks. Every weight replaced is then checked
against the float32 weight transformers made from the same file, so a mapping
this does not understand is refused at load, never served wrong.
"""

import logging
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_runtime import kernels
from model_runtime.weights.quantization import (
    GROUP,
    GroupwiseLinear,
    Int4Linear,
    Int8Linear,
    dequantize_groups,
    group_size,
    replace_linears,
    unpack_nibbles,
)

logger = logging.getLogger(__name__)

# (weights, bytes) of one block, by GGUF type name, for the types served from their blocks.
BLOCK_SHAPES = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
# |served - transformers' float32| allowed, relative to the weight's largest
# magnitude: the file's Q4_1 values are q * d + m, rounded once by the kernel's
# fused multiply-add and twice by numpy's dequantization.
EXACT_RTOL = 1e-6


@dataclass(frozen=True, slots=True)
class Blocks:
    """One GGUF tensor's blocks as groupwise weights: ``q`` int8 [N, K] or
    packed nibbles uint8 [N, K / 2] (``int4``), float32 ``scales`` and
    ``offsets`` [N, K / 32]."""

    type_name: str  # the file's GGML type: "Q4_1", ...
    int4: bool
    q: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor

    def rows(self, order: torch.Tensor) -> "Blocks":
        reordered = (self.q[order].contiguous(), self.scales[order].contiguous(), self.offsets[order].contiguous())
        return Blocks(self.type_name, self.int4, *reordered)

    def linear(self, bias: torch.Tensor | None, ops: object | None) -> GroupwiseLinear:
        in_features = self.q.shape[1] * (2 if self.int4 else 1)
        cls = Int4Linear if self.int4 else Int8Linear
        module = cls(self.q, self.scales, self.offsets, bias, ops, in_features)
        module.gguf_type = self.type_name
        return module

    def dequantized(self) -> torch.Tensor:
        return dequantize_groups(unpack_nibbles(self.q) if self.int4 else self.q, self.scales, self.offsets)


def decode_blocks(raw: np.ndarray, type_name: str) -> Blocks | None:
    """``raw`` uint8 [N, bytes per row] of a GGUF tensor of type ``type_name``
    as ``Blocks``, or None for a type served as float."""
    if type_name not in BLOCK_SHAPES or raw.ndim != 2:
        return None
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, BLOCK_SHAPES[type_name][1])
    n = blocks.shape[0]
    if type_name in ("Q4_0", "Q4_1", "Q8_0"):  # already groups of 32 in the kernel's order
        body = blocks[:, :, 2 if type_name != "Q4_1" else 4 :].reshape(n, -1)
        q, scales = torch.from_numpy(body.copy()), _half(blocks, 0)
        if type_name == "Q8_0":
            return Blocks(type_name, False, q.view(torch.int8), scales, torch.zeros_like(scales))
        return Blocks(type_name, True, q, scales, -8 * scales if type_name == "Q4_0" else _half(blocks, 2))
    values, scales, offsets = _GROUP_DECODERS[type_name](blocks)  # [n, blocks, groups, 32 or 16], [n, blocks, groups] x 2
    scales, offsets = scales.reshape(n, -1), offsets.reshape(n, -1)
    if type_name in INT4_TYPES:
        values = values.reshape(n, -1, GROUP)
        q = torch.from_numpy((values[:, :, : GROUP // 2] | (values[:, :, GROUP // 2 :] << 4)).reshape(n, -1))
    else:
        q = torch.from_numpy(values.astype(np.int8).reshape(n, -1))
    return Blocks(type_name, type_name in INT4_TYPES, q, torch.from_numpy(scales), torch.from_numpy(offsets))


def _half(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of every block, as float32 [n, blocks]."""
    return torch.from_numpy(_halves(blocks, start))


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, :, start : start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(data: np.ndarray) -> np.ndarray:
    """[..., 16] bytes as the 32 weights Q4_0 and Q5_0 order them: low halves, then high halves."""
    return np.concatenate((data & 15, data >> 4), axis=-1)


def _fifth_bits(blocks: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's ``qh`` (bytes 2..5 after the scales): bit i of the
    little-endian word is weight i's fifth bit, as [n, blocks, 1, 32] 0/16."""
    start = blocks.shape[2] - 20  # qh then 16 bytes of nibbles end the block
    words = blocks[:, :, start : start + 4].copy().view("<u4")
    return (((words >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)[:, :, None, :]


def _q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = (_nibbles(blocks[:, :, None, 6:22]) | _fifth_bits(blocks)).astype(np.int16) - 16
    d = _halves(blocks, 0)[..., None]
    return q, d, np.zeros_like(d)


def _q5_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _nibbles(blocks[:, :, None, 8:24]) | _fifth_bits(blocks)
    return q, _halves(blocks, 0)[..., None], _halves(blocks, 2)[..., None]


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's eight 6-bit scales and minimums per super-block, from its
    twelve bytes 4..15: bytes 0-3 hold scales 0-3 in their low six bits and
    the top two bits of scales 4-7 above them, bytes 4-7 the same for the
    minimums, bytes 8-11 the low four bits of scales 4-7 (low nibble) and of
    minimums 4-7 (high nibble)."""
    packed = blocks[:, :, 4:16]
    low_scales, low_mins, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate((low_scales & 63, (rest & 15) | ((low_scales >> 6) << 4)), axis=-1)
    minimums = np.concatenate((low_mins & 63, (rest >> 4) | ((low_mins >> 6) << 4)), axis=-1)
    return scales.astype(np.float32), minimums.astype(np.float32)


def _k_nibbles(data: np.ndarray) -> np.ndarray:
    """128 bytes of a K-quant super-block as its eight groups of 32 nibbles:
    32 bytes hold group 2j in their low halves and group 2j + 1 in their high ones."""
    chunks = data.reshape(*data.shape[:2], 4, 1, 32)
    return np.concatenate((chunks & 15, chunks >> 4), axis=3).reshape(*data.shape[:2], 8, 32)


def _k_scale_offset(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scales, minimums = _k_scales(blocks)
    return _halves(blocks, 0)[..., None] * scales, -(_halves(blocks, 2)[..., None] * minimums)


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (_k_nibbles(blocks[:, :, 16:144]), *_k_scale_offset(blocks))


def _q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    high = blocks[:, :, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]  # group j: bit j of each of 32 bytes
    return (_k_nibbles(blocks[:, :, 48:176]) | ((high & 1) << 4), *_k_scale_offset(blocks))


def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K: two halves of 128 weights, each from 64 bytes of low four bits
    (weights 0-63 in the low nibbles, 64-127 in the high ones) and 32 bytes of
    top two bits (bits 2s..2s+1 of byte i for weight 32s + i), minus 32; then
    sixteen int8 scales, one per 16 weights, and the float16 ``d`` last."""
    n, count = blocks.shape[:2]
    low = blocks[:, :, :128].reshape(n, count, 2, 1, 64)
    low = np.concatenate((low & 15, low >> 4), axis=3).reshape(n, count, 2, 128)
    high = blocks[:, :, 128:192].reshape(n, count, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    q = (low | ((high & 3).reshape(n, count, 2, 128) << 4)).astype(np.int16) - 32
    scales = _halves(blocks, 208)[..., None] * blocks[:, :, 192:208].view(np.int8).astype(np.float32)
    return q.reshape(n, count, 16, 16), scales, np.zeros_like(scales)


# Types whose blocks are regrouped: the weights q, scales and offsets per group of 32 (Q6_K: 16).
_GROUP_DECODERS = {"Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def row_order(processor: object, gguf_name: str, rows: int) -> torch.Tensor | None:
    """The rows of the GGUF tensor in the order transformers' processor puts
    them in (Llama's q/k: un-permuted), or None when the processor does more
    than reorder rows."""
    column = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    processed = processor.process(weights=column, name=gguf_name, tensor_key_mapping={}, parsed_parameters={}).weights
    if processed.shape != (rows, 1) or sorted(processed[:, 0].tolist()) != list(range(rows)):
        return None
    return torch.from_numpy(processed[:, 0].astype(np.int64))


@dataclass(frozen=True, slots=True)
class GgufTensor:
    name: str
    type_name: str  # GGML type: "Q4_1", "F32", ...
    data: np.ndarray  # uint8 [rows, bytes per row], mapped from the file


# GGUF metadata value types: fixed sizes (struct format), 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf(path: str | Path) -> tuple[dict[str, object], list[GgufTensor]]:
    """The scalar and string metadata of a GGUF file (arrays skipped) and its
    tensors, mapped read-only. gguf's own ``GGUFReader`` also parses every
    array (a 49k-token vocabulary: 6 s on 2 cores); this reads what serving
    the weights needs in well under a second."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(raw)
    position = 0

    def take(fmt: str):
        nonlocal position
        (value,) = struct.unpack_from("<" + fmt, buffer, position)
        position += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal position
        length = take("Q")
        position += length
        return bytes(buffer[position - length : position]).decode("utf-8", errors="replace")

    def value(kind: int):
        nonlocal position
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == _STRING:
            return string()
        if kind != _ARRAY:
            raise ValueError(f"{path}: unknown GGUF metadata type {kind}")
        item, count = take("I"), take("Q")
        if item in _SCALARS:
            position += count * struct.calcsize(_SCALARS[item])
        else:
            for _ in range(count):
                value(item)
        return None

    if bytes(buffer[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    position = 4
    _version, tensor_count, kv_count = take("I"), take("Q"), take("Q")
    metadata = {}
    for _ in range(kv_count):
        key = string()
        metadata[key] = value(take("I"))
    infos = []
    for _ in range(tensor_count):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, GGMLQuantizationType(take("I")), dims, take("Q")))
    alignment = metadata.get("general.alignment") or 32
    data_start = -(-position // alignment) * alignment
    tensors = []
    for name, ggml_type, dims, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        row_bytes = dims[0] // block * block_bytes
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        start = data_start + offset
        tensors.append(GgufTensor(name, ggml_type.name, raw[start : start + rows * row_bytes].reshape(rows, row_bytes)))
    return metadata, tensors


def read_linear_blocks(model: nn.Module, gguf_path: str | Path) -> dict[str, Blocks]:
    """``Blocks`` of every GGUF-quantized weight of ``gguf_path``, keyed by the
    ``model`` parameter name it loads into, rows in the model's order. Names
    map through gguf's table for the file's architecture, as transformers
    maps them when it loads the file."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    metadata, tensors = read_gguf(gguf_path)
    architecture = metadata.get("general.architecture")
    arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise ValueError(f"--quantization gguf: {gguf_path} has architecture {architecture!r}, which gguf does not know")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    name_map = get_tensor_name_map(arch, model.config.num_hidden_layers)
    hf_names = {}
    for hf_name in model.state_dict():
        stem, _, suffix = processor.preprocess_name(hf_name).rpartition(".")
        gguf_stem = name_map.get_name(stem)
        if gguf_stem is not None:
            hf_names.setdefault(f"{gguf_stem}.{suffix}", hf_name)
    found = {}
    for tensor in tensors:
        blocks = None if tensor.name not in hf_names else decode_blocks(tensor.data, tensor.type_name)
        if blocks is None:
            continue
        order = row_order(processor, tensor.name, blocks.q.shape[0])
        if order is None:
            raise ValueError(
                f"--quantization gguf: {tensor.name} ({architecture}) is more than a reordering of rows in "
                f"transformers; serve it without --quantization gguf"
            )
        found[hf_names[tensor.name]] = blocks.rows(order)
    return found


def load_gguf_linears(model: nn.Module, gguf_path: str | Path) -> list[GroupwiseLinear]:
    """Replace each linear of ``model`` (loaded from ``gguf_path`` by
    transformers, or from a float32 copy of it) whose weight the file stores
    as one of ``BLOCK_SHAPES``' types by the matching groupwise module (kernels
    chosen later: ``choose_groupwise_kernels``); a tied LM head takes the input embedding's blocks, and an
    embedding stored without offsets is looked up in them (``BlockEmbedding``).
    Raises ValueError when a served weight would differ from the model's."""
    blocks = read_linear_blocks(model, gguf_path)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied_head = head is not None and embedding is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
    embedding_name = next((name for name, module in model.named_modules() if module is embedding), None)
    ops = kernels.load()

    def from_file(name: str, module: nn.Module, weight: torch.Tensor) -> GroupwiseLinear | None:
        source = blocks.get(f"{name}.weight")
        if source is None and module is head and tied_head:
            source = blocks.get(f"{embedding_name}.weight")
        if source is None:
            return None
        served = source.linear(module.bias, ops)
        check_exact(name, served.dequantized(), weight)
        return served

    linears = replace_linears(model, from_file)
    source = blocks.get(f"{embedding_name}.weight")
    if source is not None and type(embedding) is nn.Embedding and embedding.max_norm is None and not source.offsets.any():
        served = BlockEmbedding(source)
        if torch.equal(served(torch.arange(served.num_embeddings)), embedding.weight):
            model.set_input_embeddings(served)
    return linears


class BlockEmbedding(nn.Module):
    """An input embedding looked up in the file's own blocks (a tied LM head
    reads the very same tensors): each row's codes times its groups' scales.
    Only for blocks with no offsets (Q8_0, Q5_0, Q6_K): ``q * d`` is one
    rounding, as gguf's dequantization makes it, however a compiler fuses it,
    so the rows equal the float32 embedding's (checked whole at load). Saves
    the float32 copy: 108 MiB on the default model."""

    def __init__(self, blocks: Blocks) -> None:
        super().__init__()
        self.int4 = blocks.int4
        self.num_embeddings, self.embedding_dim = blocks.q.shape[0], blocks.q.shape[1] * (2 if blocks.int4 else 1)
        self.register_buffer("q", blocks.q, persistent=False)
        self.register_buffer("scales", blocks.scales, persistent=False)
        group = group_size(self.embedding_dim, blocks.scales.shape[1])
        self.register_buffer("group_of", torch.arange(self.embedding_dim) // group, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.q[ids]
        values = unpack_nibbles(q.reshape(-1, q.shape[-1])).reshape(*ids.shape, -1) if self.int4 else q
        return values.float() * self.scales[ids][..., self.group_of]


def block_types(linears: list[GroupwiseLinear]) -> str:
    """How many served linears hold each GGUF type, e.g. "210 Q4_1 + 1 Q8_0"."""
    counts = Counter(getattr(module, "gguf_type", module.KIND) for module in linears)
    return " + ".join(f"{count} {type_name}" for type_name, count in counts.items()) or "no linears"


def check_exact(name: str, served: torch.Tensor, weight: torch.Tensor) -> None:
    if served.shape != weight.shape:
        raise ValueError(f"--quantization gguf: {name} is {tuple(served.shape)} in the file, {tuple(weight.shape)} in the model")
    error = (served - weight.float()).abs().max().item()
    if error > EXACT_RTOL * max(weight.abs().max().item(), 1e-30):
        raise ValueError(
            f"--quantization gguf: {name} read from the file differs from the model's weight by up to {error:.3g}; refusing to serve it"
        )

"""CPU weight layout for the linear layers, chosen per dtype.

**float32:** store ``nn.Linear`` weights as ``[in, out]`` in memory.
``F.linear(x, W)`` multiplies by ``W.t()``. With the default ``[out, in]``
storage that is a transposed operand, and at the small row counts of a decode
step (1-64 rows) MKL's GEMM runs up to 2-3x slower on it than on a contiguous
``[in, out]`` matrix (measured here: 1536->576 at 16 rows, 235 us vs 96 us).
Re-laying each weight out as ``W.t().contiguous().t()`` keeps its shape and
values (the model's code is untouched) and changes only its strides. The LM
head is left alone: at 49152 outputs the default layout is faster, and it is
often tied to the input embedding, which must stay row-major for lookups.

**bfloat16** (on CPUs with native bf16: AMX or AVX512-BF16): every linear,
the LM head included, becomes a ``PackedLinear`` whose weight is reordered
once into oneDNN's blocked layout and multiplied by oneDNN (AMX tiles where
present). Decode step of the default model here, B = 1 / 16 / 64: bf16 plain
38.9 / 57.3 / 113.1 ms, bf16 packed 30.0 / 49.2 / 109.2 ms (float32 with the
``[in, out]`` layout: 35.5 / 88.8 / 190.4 ms). Packing float32 weights the
same way was no better (46.5 / 79.4 / 187.9 ms), so float32 keeps the layout.
"""

import torch
from torch import nn

# oneDNN picks its blocked layout for an expected row count; decode steps
# run 1-64 rows and 16 measured as well as any other hint at every size.
_PACKING_ROWS_HINT = 16


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
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


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


def pack_linears(model: nn.Module) -> int:
    """Replace every CPU ``nn.Linear`` (LM head included) by a ``PackedLinear``; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def optimise_cpu_linears(model: nn.Module, dtype: torch.dtype) -> str:
    """Pick the faster layout for ``dtype`` on this CPU; returns what was done."""
    if dtype == torch.bfloat16 and has_native_bf16():
        return f"{pack_linears(model)} linears packed for oneDNN (bf16)"
    return f"{prefer_input_major_linears(model)} linears laid out [in, out]"

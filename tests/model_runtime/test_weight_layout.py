"""The CPU linear-layer layouts compute what ``nn.Linear`` computes."""

import pytest
import torch
from torch import nn

from model_runtime.weight_layout import PACKED_FROM_ROWS, PackedLinear, RowSwitchedLinear, optimise_cpu_linears


@pytest.mark.parametrize("rows", [1, 7, 16, 64])
def test_packed_linear_matches_linear_in_bf16(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
    expected = linear(x).float()
    got = PackedLinear(linear)(x).float()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows", [1, PACKED_FROM_ROWS - 1, PACKED_FROM_ROWS, 64])
def test_row_switched_linear_matches_linear_in_float32_on_both_paths(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    x = torch.randn(1, rows, 96)
    torch.testing.assert_close(RowSwitchedLinear(linear)(x), linear(x), atol=1e-5, rtol=1e-5)


def test_float32_model_gets_row_switched_linears_with_the_same_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 8)
    before = model(x)
    assert "2 linears kept [in, out]" in optimise_cpu_linears(model, torch.float32)
    assert all(isinstance(m, RowSwitchedLinear) for m in (model[0], model[2]))
    torch.testing.assert_close(model(x), before)

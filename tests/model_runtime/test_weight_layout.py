"""The CPU linear-layer layouts compute what ``nn.Linear`` computes."""

import pytest
import torch
from torch import nn

from model_runtime.weight_layout import PACKED_FROM_ROWS, PROBE_ROWS, PackedLinear, RowSwitchedLinear, choose_packed_from_rows, optimise_cpu_linears


@pytest.mark.parametrize("rows", [1, 7, 16, 64])
def test_packed_linear_matches_linear_in_bf16(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
    expected = linear(x).float()
    got = PackedLinear(linear)(x).float()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("packed_from_rows", [1, 2, PACKED_FROM_ROWS])
@pytest.mark.parametrize("rows", [1, PACKED_FROM_ROWS - 1, PACKED_FROM_ROWS, 64])
def test_row_switched_linear_matches_linear_in_float32_on_both_paths(rows, packed_from_rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    x = torch.randn(1, rows, 96)
    switched = RowSwitchedLinear(linear)
    switched.use_packed_from(packed_from_rows)
    assert (switched.weight is None) == (packed_from_rows == 1), "packed from one row on: the [in, out] copy is freed"
    torch.testing.assert_close(switched(x), linear(x), atol=1e-5, rtol=1e-5)


def test_the_switch_row_is_measured_among_the_probes():
    torch.manual_seed(0)
    linears = [RowSwitchedLinear(nn.Linear(64, 256)) for _ in range(4)]
    assert choose_packed_from_rows(linears) in {*PROBE_ROWS, PACKED_FROM_ROWS}


def test_float32_model_gets_row_switched_linears_with_the_same_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 8)
    before = model(x)
    assert "measured at load" in optimise_cpu_linears(model, torch.float32)
    assert all(isinstance(m, RowSwitchedLinear) for m in (model[0], model[2]))
    assert model[0].packed_from_rows == model[2].packed_from_rows
    torch.testing.assert_close(model(x), before)

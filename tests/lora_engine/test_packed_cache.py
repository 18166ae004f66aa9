"""The kernels' view of a 4-bit weight is built once per weight and rebuilt when its tensors are replaced."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_engine
from lora_engine import format as fmt
from lora_engine import reference
from lora_engine.format import quantize_weight

pytestmark = pytest.mark.interpreter


class _Counts:
    builds = 0  # operands built (packed_4bit)
    validations = 0  # weight and quant state validated (weight_shape)


@pytest.fixture
def counts(monkeypatch):
    """Count how often the operands are built and the weight validated."""
    seen = _Counts()
    original_build, original_check = fmt.packed_4bit, fmt.weight_shape

    def counting_build(weight, quant_state):
        seen.builds += 1
        return original_build(weight, quant_state)

    def counting_check(weight, quant_state):
        seen.validations += 1
        return original_check(weight, quant_state)

    monkeypatch.setattr(fmt, "packed_4bit", counting_build)
    monkeypatch.setattr(fmt, "weight_shape", counting_check)
    return seen


def _call(x, weight):
    torch.manual_seed(3)
    lora_A, lora_B = torch.randn(4, x.shape[1], device=x.device), torch.randn(weight.quant_state.shape[0], 4,
                                                                              device=x.device)  # fmt: skip
    y = lora_engine.lora_linear_4bit(x, weight, weight.quant_state, lora_A, lora_B, 1.0)
    with lora_engine.use_backend("torch"):
        expected = lora_engine.lora_linear_4bit(x, weight, weight.quant_state, lora_A, lora_B, 1.0)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    return y


def test_built_once_and_rebuilt_when_the_weight_is_replaced(counts, kernel_device):
    weight = quantize_weight(torch.randn(24, 128), "nf4", 64, True, device=kernel_device)
    x = torch.randn(3, 128, device=kernel_device)
    _call(x, weight)
    assert (counts.builds, counts.validations) == (1, 1)
    with lora_engine.use_backend("triton"):
        for _ in range(3):
            lora_engine.lora_linear_4bit(x, weight, weight.quant_state, torch.randn(4, 128, device=kernel_device),
                                         torch.randn(24, 4, device=kernel_device), 1.0)  # fmt: skip
    assert (counts.builds, counts.validations) == (1, 1), "a later call validated or rebuilt the weight again"

    other = quantize_weight(torch.randn(24, 128), "nf4", 64, True, device=kernel_device)
    weight.data = other.data.clone()  # new bytes, same quant state object (statistics no longer match: fine here)
    _call(x, weight)
    assert counts.builds == 2, "new packed bytes must rebuild the operands"

    weight.quant_state = copy.deepcopy(other.quant_state)  # a new quant state object
    y = _call(x, weight)
    assert counts.builds == 3
    torch.testing.assert_close(reference.dequantize_4bit(weight, weight.quant_state), reference.dequantize_4bit(
        other, other.quant_state))  # fmt: skip
    assert y.isfinite().all()

    weight.quant_state.absmax = weight.quant_state.absmax.clone()  # replaced statistics on the same state
    _call(x, weight)
    assert counts.builds == 4

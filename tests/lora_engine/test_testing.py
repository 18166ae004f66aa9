"""The three-way tolerance rule itself: it passes torch's own result and fails a real error."""

import pytest
import torch

from lora_engine.testing import assert_close_3way


def _product():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(33, 200, generator=gen), torch.randn(200, 17, generator=gen)
    return a @ b, a.double() @ b.double()


def test_passes_torch_itself():
    same, precise = _product()
    assert_close_3way("torch", same, precise, same)


@pytest.mark.parametrize("damage", ["one_element_off", "nan", "transposed_index"])
def test_fails_a_wrong_result(damage):
    same, precise = _product()
    wrong = same.clone()
    if damage == "one_element_off":
        wrong[5, 3] *= 1 + 1e-4  # ~800 fp32 ulps on one element
    elif damage == "nan":
        wrong[0, 0] = float("nan")
    else:
        wrong[[1, 2]] = wrong[[2, 1]]
    with pytest.raises(AssertionError, match="elements off by more than"):
        assert_close_3way(damage, wrong, precise, same)

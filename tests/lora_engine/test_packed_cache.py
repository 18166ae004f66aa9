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


def test_a_cached_call_makes_no_flat_view_of_the_weight(monkeypatch, kernel_device):
    """A call whose operands are cached reads the weight's address and size directly: no flat uint8 view per call."""
    weight = quantize_weight(torch.randn(24, 128), "nf4", 64, True, device=kernel_device)
    x = torch.randn(3, 128, device=kernel_device)
    _call(x, weight)
    views = []
    original = fmt.packed_bytes
    monkeypatch.setattr(fmt, "packed_bytes", lambda w: views.append(w) or original(w))
    with lora_engine.use_backend("triton"):
        lora_engine.lora_linear_4bit(x, weight, weight.quant_state, torch.randn(4, 128, device=kernel_device),
                                     torch.randn(24, 4, device=kernel_device), 1.0)  # fmt: skip
    assert not views, "a cached call made a flat view of the packed bytes"


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_bytes_rewritten_in_place_give_the_new_answer(contiguous, counts, kernel_device):
    """Operands never outlive the bytes they describe: rewritten in place (same address), a contiguous weight's
    cached operands read the new bytes; a strided one is read through a copy, made anew at every call."""
    weight = quantize_weight(torch.randn(24, 128), "nf4", 64, True, device=kernel_device)
    other = quantize_weight(torch.randn(24, 128), "nf4", 64, True, device=kernel_device)
    packed = weight.data.reshape(-1)
    if not contiguous:  # the same bytes, every other byte of a buffer twice as long
        packed = torch.zeros(packed.numel(), 2, dtype=torch.uint8, device=kernel_device)[:, 0]
        packed.copy_(weight.data.reshape(-1))
        assert not packed.is_contiguous()
    state = weight.quant_state
    x, lora_A, lora_B = (torch.randn(*shape, device=kernel_device) for shape in ((3, 128), (4, 128), (24, 4)))

    def call() -> torch.Tensor:
        y = lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 1.0)
        with lora_engine.use_backend("torch"):
            torch.testing.assert_close(y, lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 1.0),
                                       rtol=1e-4, atol=1e-4)  # fmt: skip
        return y

    first = call()
    packed.copy_(other.data.reshape(-1))  # the other weight's codes under the same statistics: other values
    second = call()
    assert (second - first).abs().max() > 1e-2, "the second call was served the first bytes' operands"
    assert counts.builds == (1 if contiguous else 2)


def test_entries_go_with_their_quant_state():
    """The cache holds a value per live object: a collected quant state's entry is dropped, and an object that
    reuses its id is not served it."""
    import gc

    class State:  # weak-referenceable and unhashable, as bitsandbytes' QuantState
        __hash__ = None

    cache = fmt._ByIdentity()
    states = [State() for _ in range(3)]
    for i, state in enumerate(states):
        cache[state] = i
    assert [cache.get(state) for state in states] == [0, 1, 2] and len(cache) == 3
    gone = id(states[1])
    del states[1]
    gc.collect()
    assert len(cache) == 2
    newcomers = [State() for _ in range(1000)]  # CPython hands the freed memory, and so the id, to one of them
    assert all(cache.get(state) is None for state in newcomers)
    reused = [state for state in newcomers if id(state) == gone]
    cache[reused[0] if reused else newcomers[0]] = "new"
    assert cache.get(reused[0] if reused else newcomers[0]) == "new" and len(cache) == 3

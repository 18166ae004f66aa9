"""Several named adapters on one layer: the active one is ``lora_A``/``lora_B``, the others are parked."""

import collections
import copy

import pytest
import torch
from torch import nn

import lora_engine
from lora_engine import LoRALinear, LoRALinear4bit

pytestmark = pytest.mark.interpreter


def _layer(kind: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(100, 37).to(device)
    if kind == "4bit":
        layer = LoRALinear4bit.from_linear(linear, r=8, lora_alpha=16, compute_dtype=torch.float32)
    else:
        layer = LoRALinear.from_linear(linear, r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)  # fresh B is zero: every adapter would compute the same
    return layer


def _base_weight(layer: nn.Module) -> torch.Tensor:
    return layer.dequantize() if isinstance(layer, LoRALinear4bit) else layer.weight.detach()


def _expected(layer: nn.Module, x: torch.Tensor, lora_A, lora_B, scaling: float) -> torch.Tensor:
    return lora_engine.reference.lora_linear(x, _base_weight(layer), lora_A, lora_B, scaling, layer.bias)


KINDS = ["4bit", "dense"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_adapter_keeps_the_old_parameters_and_keys(kind, kernel_device):
    layer = _layer(kind, kernel_device)
    assert layer.adapter_names == ["default"] and layer.active_adapter == "default"
    names = [name for name, _ in layer.named_parameters()]
    assert names == ["weight", "bias", "lora_A", "lora_B"]
    assert {k for k in layer.state_dict() if not k.startswith("weight.")} == {"weight", "bias", "lora_A", "lora_B"}
    assert "adapters" not in repr(layer), "a one-adapter layer prints as before"


@pytest.mark.parametrize("kind", KINDS)
def test_add_and_switch_adapters(kind, kernel_device):
    layer = _layer(kind, kernel_device)
    x = torch.randn(5, 100, device=kernel_device)
    first = layer(x)
    default_A, default_B = layer.lora_A, layer.lora_B
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)

    layer.add_adapter("rs", r=4, lora_alpha=8, use_rslora=True)
    assert layer.active_adapter == "default" and torch.equal(layer(x), first), "adding does not activate"
    assert len(list(layer.parameters())) == 4, "a parked adapter is not a parameter"
    layer.set_adapter("rs")
    assert layer.scaling == 4.0 and layer.r == 4 and layer.lora_A.shape == (4, 100)  # alpha / sqrt(r)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    rs = layer.get_adapter("rs")
    torch.testing.assert_close(layer(x), _expected(layer, x, rs.lora_A, rs.lora_B, 4.0), rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == set(_layer(kind, kernel_device).state_dict()), "state dict: the active one"

    layer.set_adapter("default")
    assert layer.lora_A is default_A and layer.lora_B is default_B, "the same Parameter objects come back"
    assert torch.equal(layer(x), first)
    assert optimizer.param_groups[0]["params"][-2] is layer.lora_A, "an optimizer built before still holds them"
    assert "active_adapter='default', adapters=['default', 'rs']" in repr(layer)


@pytest.mark.parametrize("kind", KINDS)
def test_no_active_adapter_runs_the_base(kind, kernel_device, monkeypatch):
    """The base alone; over a 4-bit W through ``linear_4bit`` (the base-only path), never a dense copy of W."""
    layer = _layer(kind, kernel_device)
    layer.set_adapter(None)
    assert layer.lora_A is None and layer.scaling == 0.0 and "lora_A" not in layer.state_dict()
    x = torch.randn(3, 100, device=kernel_device, requires_grad=True)
    expected = x.detach() @ _base_weight(layer).t() + layer.bias
    calls = collections.Counter()
    for name in ("linear_4bit", "dequantize_4bit"):
        function = getattr(lora_engine.functional, name)
        monkeypatch.setattr(lora_engine.functional, name,
                            lambda *a, _f=function, _n=name, **k: calls.update([_n]) or _f(*a, **k))  # fmt: skip
    y = layer(x)
    assert calls == (collections.Counter(linear_4bit=1) if kind == "4bit" else collections.Counter()), calls
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is None
    torch.testing.assert_close(layer.merge()(x), y, rtol=1e-5, atol=1e-5)


def test_parked_adapters_follow_dtype_moves_and_copies():
    layer = _layer("dense", "cpu")
    layer.add_adapter("b", r=2)
    parked = layer.get_adapter("b").lora_A
    layer.double()
    assert layer.lora_A.dtype == torch.float64 and layer.get_adapter("b").lora_A.dtype == torch.float64
    assert layer.get_adapter("b").lora_A is parked, "moved in place, as nn.Module moves its parameters"
    clone = copy.deepcopy(layer)
    clone.set_adapter("b")
    assert clone.lora_A is not parked and torch.equal(clone.lora_A, parked)


def test_delete_and_bad_names():
    layer = _layer("dense", "cpu")
    layer.add_adapter("b", r=2)
    with pytest.raises(ValueError, match="adapter 'b' already exists on this layer"):
        layer.add_adapter("b", r=2)
    with pytest.raises(ValueError, match="unknown adapter 'c'; this layer has \\['default', 'b'\\]"):
        layer.set_adapter("c")
    with pytest.raises(ValueError, match="without dots"):
        layer.add_adapter("a.b", r=2)
    with pytest.raises(ValueError, match="positive integer"):
        layer.add_adapter("zero", r=0)
    layer.delete_adapter("default")
    assert layer.adapter_names == ["b"] and layer.active_adapter is None
    layer.set_adapter("b")
    assert layer.r == 2

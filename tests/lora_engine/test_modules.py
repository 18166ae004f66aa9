"""nn.Module behaviour: construction, state_dict round trip, sharing, merging, dtypes, frozen base."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import lora_engine
from lora_engine import LoRALinear, LoRALinear4bit, dispatch

pytestmark = pytest.mark.interpreter


def _trained(layer: nn.Module) -> nn.Module:
    """Give lora_B non-zero values, as after some training (fresh B is zero and hides mistakes)."""
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    return layer


def _layer(device: str, **kwargs) -> LoRALinear4bit:
    torch.manual_seed(0)
    linear = nn.Linear(100, 37).to(device)
    defaults = dict(r=8, lora_alpha=16, compute_dtype=torch.float32)
    return _trained(LoRALinear4bit.from_linear(linear, **{**defaults, **kwargs}))


def test_from_linear_builds_a_bitsandbytes_weight(kernel_device):
    layer = _layer(kernel_device, quant_type="fp4", compress_statistics=False, blocksize=128)
    assert isinstance(layer.weight, bnb.nn.Params4bit) and not layer.weight.requires_grad
    state = layer.weight.quant_state
    assert state.quant_type == "fp4" and state.blocksize == 128 and not state.nested
    assert (layer.in_features, layer.out_features, layer.r, layer.scaling) == (100, 37, 8, 2.0)
    assert layer.lora_A.shape == (8, 100) and layer.lora_B.shape == (37, 8)
    assert not layer.bias.requires_grad


def test_fresh_adapter_starts_at_the_base_layer(kernel_device):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(kernel_device)
    layer = LoRALinear4bit.from_linear(linear, r=4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / 64**0.5  # Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT
    assert layer.lora_A.abs().max() <= bound
    x = torch.randn(5, 64, device=kernel_device)
    base = x @ layer.dequantize().t() + layer.bias
    torch.testing.assert_close(layer(x), base, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_keeps_bitsandbytes_keys(kernel_device):
    layer = _layer(kernel_device)
    state = layer.state_dict()
    bnb_layer = bnb.nn.Linear4bit(100, 37, quant_type="nf4", compress_statistics=True).to(kernel_device)
    assert set(bnb_layer.state_dict()) <= set(state), "bitsandbytes' own keys must all be present"
    assert {"lora_A", "lora_B"} <= set(state)

    other = _layer(kernel_device)
    with torch.no_grad():
        other.lora_A.zero_()
    torch.manual_seed(1)
    other.weight = LoRALinear4bit.from_linear(nn.Linear(100, 37).to(kernel_device)).weight  # a different base
    result = other.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(6, 100, device=kernel_device)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_state_dict_loads_into_plain_bitsandbytes_layer(kernel_device):
    layer = _layer(kernel_device)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("lora_")}
    dense = nn.Linear(100, 37)
    dense.load_state_dict({"weight": layer.dequantize().cpu(), "bias": layer.bias.detach().cpu()})
    restored = bnb.nn.Params4bit.from_prequantized(
        state["weight"], {k[len("weight.") :]: v for k, v in state.items() if k.startswith("weight.")}, device=kernel_device
    )
    torch.testing.assert_close(
        bnb.functional.dequantize_4bit(restored.data, restored.quant_state), layer.dequantize(), rtol=0, atol=0
    )


def test_from_bnb_shares_the_weight(kernel_device):
    base = bnb.nn.Linear4bit(96, 40, quant_type="nf4", compute_dtype=torch.float32).to(kernel_device)
    layer = LoRALinear4bit.from_bnb(base, r=16, lora_alpha=32)
    assert layer.weight is base.weight
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert layer.bias is base.bias and not layer.bias.requires_grad
    x = torch.randn(3, 96, device=kernel_device)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)  # B = 0: exactly the base layer


def test_from_bnb_rejects_an_unquantized_layer():
    base = bnb.nn.Linear4bit(32, 16, device="meta")
    with pytest.raises(ValueError, match="quantized Linear4bit"):
        LoRALinear4bit.from_bnb(base, r=4)


@pytest.mark.parametrize("path", dispatch.PATHS)
def test_merge_matches_unmerged_output(path, kernel_device):
    layer = _layer(kernel_device)
    x = torch.randn(4, 7, 100, device=kernel_device)
    with lora_engine.force_path(path):
        y = layer(x)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_dtype_is_preserved_and_frozen_weight_gets_no_grad(kernel_device):
    layer = _layer(kernel_device, compute_dtype=torch.float16)
    x = torch.randn(5, 100, device=kernel_device, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32, "output comes back in the input's dtype"
    y.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_dropout_only_in_training(kernel_device):
    layer = _layer(kernel_device, lora_dropout=0.5)
    x = torch.randn(8, 100, device=kernel_device)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(a, layer(x)), "the dropout seed comes from torch's generator"
    assert not torch.equal(a, layer(x))


def test_dense_lora_linear(kernel_device):
    torch.manual_seed(0)
    linear = nn.Linear(70, 45).to(kernel_device).half()
    layer = _trained(LoRALinear.from_linear(linear, r=8, lora_alpha=8))
    assert layer.weight is linear.weight and not layer.weight.requires_grad
    x = torch.randn(9, 70, device=kernel_device, dtype=torch.float16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    ref = lora_engine.reference.lora_linear(ref_x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias)
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(layer.merge()(x), y, rtol=2e-3, atol=4e-3)
    assert layer.lora_A.grad is not None and layer.weight.grad is None


def test_repr_names_the_adapter(kernel_device):
    text = repr(_layer(kernel_device))
    assert "r=8" in text and "lora_alpha=16" in text and "in_features=100" in text


@pytest.mark.parametrize("path", dispatch.PATHS)
def test_no_grad_call_matches_the_autograd_call(path, kernel_device):
    """Inference skips autograd's bookkeeping; it must run the same computation."""
    layer = _layer(kernel_device)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(7, 100, device=kernel_device)
    with lora_engine.force_path(path):
        with_grad = layer(x)
        with torch.no_grad():
            without = layer(x)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def _int_input_layer(kind: str) -> nn.Module:
    if kind.startswith("4bit"):
        layer = LoRALinear4bit(64, 24, r=4, compute_dtype=torch.float16)
    else:
        layer = LoRALinear(64, 24, r=4)
    if kind.endswith("no_adapter"):
        layer.set_adapter(None)
    return layer


@pytest.mark.parametrize("kind", ["4bit_compute_fp16", "4bit_compute_fp16_no_adapter", "dense", "dense_no_adapter"])
def test_integer_input_is_rejected_not_truncated(kind):
    """A cast to the compute dtype must not turn an integer input into a float computation with an int result."""
    layer = _int_input_layer(kind)
    with lora_engine.use_backend("torch"), pytest.raises(TypeError, match="torch.int64"):
        layer(torch.ones(2, 64, dtype=torch.int64))


def test_base_weight_is_frozen_whatever_it_was():
    """Even a float-storage 4-bit weight that requires grad is frozen on wrap, so parameters() shows it untrained."""
    base = bnb.nn.Linear4bit(64, 24, quant_type="nf4", quant_storage=torch.float32).to("cpu")
    base.weight.requires_grad_(True)
    layers = {
        "from_bnb": LoRALinear4bit.from_bnb(base, r=4),
        "from_linear": LoRALinear4bit.from_linear(nn.Linear(64, 24), r=4, quant_storage=torch.float32),
        "__init__": LoRALinear4bit(64, 24, r=4, quant_storage=torch.float32),
    }
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.float32, name
        trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
        assert trainable == ["lora_A", "lora_B"], f"{name}: trainable {trainable}"
    assert layers["from_bnb"].weight is base.weight, "from_bnb shares the weight (and freezes it)"


@pytest.mark.parametrize("storage", [torch.float32, torch.float16, torch.bfloat16, torch.uint8], ids=str)
def test_module_casts_move_the_packed_weight_but_never_convert_it(storage):
    """.half(), .to(dtype), .double() cast the LoRA factors and bias as for nn.Linear; the packed 4-bit codes
    keep their storage dtype and bytes, whatever it is (a float storage would otherwise be converted value by
    value and the layer broken for good)."""
    torch.manual_seed(0)
    layer = LoRALinear4bit(64, 16, r=4, quant_storage=storage, compute_dtype=torch.float32)
    dense, state = layer.dequantize().clone(), layer.weight.quant_state
    # (torch's opt-in swap_module_params_on_conversion mode cannot swap bitsandbytes' Params4bit at all)
    for cast, dtype in ((LoRALinear4bit.half, torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                        (LoRALinear4bit.double, torch.float64), (LoRALinear4bit.float, torch.float32)):  # fmt: skip
        cast(layer)
        assert layer.weight.dtype == storage and layer.lora_A.dtype == dtype and layer.bias.dtype == dtype
        assert layer.weight.quant_state is state and not layer.weight.requires_grad
        assert torch.equal(layer.dequantize(), dense)
    with lora_engine.use_backend("torch"):
        assert layer(torch.randn(3, 64)).isfinite().all()

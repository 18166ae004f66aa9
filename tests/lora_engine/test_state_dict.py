"""LoRALinear4bit.load_state_dict: all or nothing, nn.Linear state dicts, errors that name the problem."""

import re
from collections.abc import Callable

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import lora_engine
from lora_engine import LoRALinear4bit, reference
from lora_engine.format import quantize_weight

# blocks straddle rows (in_features % blocksize != 0); 4-byte storage needs OUT * IN / 2 divisible by 4
IN, OUT = 100, 38


@pytest.fixture(autouse=True)
def torch_backend():
    """These tests are about loading, not the kernels: the torch reference computes every forward."""
    with lora_engine.use_backend("torch"):
        yield


def _layer(seed: int = 0, in_features: int = IN, out_features: int = OUT, **kwargs) -> LoRALinear4bit:
    torch.manual_seed(seed)
    layer = LoRALinear4bit.from_linear(nn.Linear(in_features, out_features), r=4, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)  # a fresh B is zero and would hide a lora_A that changed
    return layer


def _foreign_state(seed: int = 1, **kwargs) -> dict[str, torch.Tensor]:
    """A complete, valid state dict of another layer of the same shape: every value differs from ``_layer()``'s."""
    return dict(_layer(seed, **kwargs).state_dict())


def _other_shape(state):
    return dict(_layer(1, in_features=64).state_dict())


def _weight_of_other_shape(state):
    """Only the weight is wrong: lora_A, lora_B and bias would load."""
    other = _layer(1, in_features=IN, out_features=OUT + 3).state_dict()
    return {**state, **{k: v for k, v in other.items() if k == "weight" or k.startswith("weight.")}}


def _lora_B_of_other_rank(state):
    """Only lora_B is wrong: the weight, lora_A and bias would load."""
    return {**state, "lora_B": torch.randn(OUT, 5)}


def _meta_lora_B(state):
    """Passes every check torch makes before copying, then fails to copy (after lora_A was copied)."""
    return {**state, "lora_B": torch.empty(OUT, 4, device="meta")}


def _dense_weight_with_stats(state):
    return {**state, "weight": torch.randn(OUT, IN)}


def _missing_absmax(state):
    return {k: v for k, v in state.items() if k != "weight.absmax"}


def _packed_weight_without_stats(state):
    return {k: v for k, v in state.items() if not k.startswith("weight.")}


def _dense_weight_of_other_shape(state):
    return {k: v for k, v in state.items() if not k.startswith("weight.")} | {"weight": torch.randn(OUT, IN + 1)}


BAD_STATES: dict[str, tuple[Callable[[dict], dict], str]] = {
    "other_shape": (_other_shape, r"weight: .*\[38, 64\].*\[38, 100\]"),
    "weight_of_other_shape": (_weight_of_other_shape, r"weight: .*\[41, 100\].*\[38, 100\]"),
    "lora_B_of_other_rank": (_lora_B_of_other_rank, r"size mismatch for lora_B"),
    "meta_lora_B": (_meta_lora_B, r"lora_B.*Cannot copy out of meta tensor"),
    "dense_weight_with_stats": (_dense_weight_with_stats, r"weight: a dense \[38, 100\] weight .* statistics"),
    "missing_absmax": (_missing_absmax, r"missing weight\.absmax"),
    "packed_weight_without_stats": (_packed_weight_without_stats, r"without its quantization statistics"),
    "dense_weight_of_other_shape": (_dense_weight_of_other_shape, r"weight: .*\[38, 101\].*\[38, 100\]"),
}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
@pytest.mark.parametrize("case", list(BAD_STATES))
def test_failed_load_leaves_the_layer_as_it_was(case, strict):
    layer = _layer()
    make_bad, message = BAD_STATES[case]
    bad = make_bad(_foreign_state())
    weight, quant_state = layer.weight, layer.weight.quant_state
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(5, IN)
    y = layer(x)

    # as for nn.Linear, a size mismatch raises whatever ``strict`` says
    with pytest.raises(RuntimeError) as failure:
        layer.load_state_dict(bad, strict=strict)

    assert layer.weight is weight, "a failed load replaced the weight"
    assert layer.weight.quant_state is quant_state, "a failed load replaced the quant state"
    after = layer.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"a failed load changed {changed}"
    assert torch.equal(layer(x), y)
    assert re.search(message, str(failure.value)), f"the error does not name the problem: {failure.value}"


def test_all_errors_are_reported_together():
    layer = _layer()
    bad = {**_foreign_state(), "weight": torch.randn(OUT, IN), "lora_A": torch.randn(4, IN + 1)}
    with pytest.raises(RuntimeError, match=r"(?s)weight: a dense .*size mismatch for lora_A"):
        layer.load_state_dict(bad)


@pytest.mark.parametrize(
    "key",
    ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"],
)
def test_a_missing_quantization_key_is_named(key):
    layer = _layer()
    weight = layer.weight
    state = _foreign_state()
    del state["weight." + key]
    with pytest.raises(RuntimeError, match=rf"missing weight\.{key}"):
        layer.load_state_dict(state, strict=False)
    assert layer.weight is weight


def test_an_unknown_quantization_key_is_unexpected():
    """As for any module, a key the layer does not know is unexpected; the rest loads, in the checkpoint's format."""
    layer = _layer()
    source = _layer(1, quant_type="fp4", compress_statistics=False, blocksize=128, quant_storage=torch.float32)
    state = {**source.state_dict(), "weight.absmax_v2": torch.ones(3)}
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight.absmax_v2"'):
        layer.load_state_dict(state)
    result = layer.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["weight.absmax_v2"] and not result.missing_keys
    quant_state = layer.weight.quant_state
    assert (quant_state.quant_type, quant_state.blocksize, quant_state.nested) == ("fp4", 128, False)
    assert layer.weight.dtype == torch.float32 and not layer.weight.requires_grad
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), source(x), rtol=0, atol=0)


FORMATS = {
    "nf4-nested": {"quant_type": "nf4", "compress_statistics": True, "blocksize": 64},
    "fp4-plain-fp32-storage": {
        "quant_type": "fp4",
        "compress_statistics": False,
        "blocksize": 128,
        "quant_storage": torch.float32,
    },
    "nf4-fp16-storage": {
        "quant_type": "nf4",
        "compress_statistics": True,
        "blocksize": 32,
        "quant_storage": torch.float16,
    },
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_nn_linear_state_dict_is_quantized_into_the_layers_format(fmt):
    kwargs = FORMATS[fmt]
    layer = _layer(**kwargs)
    before = layer.weight.quant_state
    torch.manual_seed(7)
    dense = nn.Linear(IN, OUT)

    result = layer.load_state_dict(dense.state_dict(), strict=False)

    assert sorted(result.missing_keys) == ["lora_A", "lora_B"] and not result.unexpected_keys
    state = layer.weight.quant_state
    assert isinstance(layer.weight, bnb.nn.Params4bit) and not layer.weight.requires_grad
    assert (state.quant_type, state.blocksize, state.nested) == (before.quant_type, before.blocksize, before.nested)
    assert layer.weight.dtype == kwargs.get("quant_storage", torch.uint8)
    assert tuple(state.shape) == (OUT, IN)

    expected = quantize_weight(
        dense.weight.data, kwargs["quant_type"], kwargs["blocksize"], kwargs["compress_statistics"],
        kwargs.get("quant_storage", torch.uint8),
    )  # fmt: skip
    expected_dense = reference.dequantize_4bit(expected, expected.quant_state)
    assert torch.equal(layer.dequantize(), expected_dense), "not the same quantization as bitsandbytes'"
    # within 4-bit quantization error of the dense weight (half the widest gap of either code table, per block)
    assert (layer.dequantize() - dense.weight).abs().max() <= 0.17 * dense.weight.abs().max()
    assert torch.equal(layer.bias, dense.bias)

    x = torch.randn(6, IN)
    want = reference.lora_linear(x, expected_dense, layer.lora_A, layer.lora_B, layer.scaling, dense.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)

    # saved again, it carries bitsandbytes' keys, which load back bit for bit
    copy = _layer(2, **kwargs)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.dequantize(), expected_dense)

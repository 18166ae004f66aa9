"""The pure-torch reference reads bitsandbytes' layouts exactly."""

import copy
import os

import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

import lora_engine
from lora_engine import reference
from lora_engine.format import is_cpu_packed
from lora_engine.testing import assert_bitwise_equal


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_dequantize_is_bitwise_bitsandbytes(quant_type, nested, blocksize, dtype):
    """Bitwise equal to bitsandbytes' float32 decode rounded once to ``dtype``.

    bitsandbytes' native CPU kernels on some processors round half-precision outputs through an extra
    fp16 step (one ulp apart on a few elements), so the float32 decode is the portable definition.
    """
    torch.manual_seed(blocksize)
    for shape in [(37, 100), (5, 333)]:
        dense = (torch.randn(shape) * 2).to(dtype)
        packed, state = bnbF.quantize_4bit(dense, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        state32 = copy.copy(state)
        state32.dtype = torch.float32
        expected = bnbF.dequantize_4bit(packed, state32).to(dtype)
        assert_bitwise_equal(f"reference {shape}", reference.dequantize_4bit(packed, state, dtype), expected)


def _cpu_packed(nested: bool):
    """A weight as bitsandbytes repacks it for its AVX512 CPU kernel (done here explicitly, on any CPU), and
    what it must decode to: the standard codes times the absmax rounded to bf16, as the repacking stores it."""
    torch.manual_seed(0)
    packed, state = bnbF.quantize_4bit(torch.randn(64, 128), blocksize=64, quant_type="nf4", compress_statistics=nested)
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    rounded = bnbF.QuantState(
        absmax=absmax.to(torch.bfloat16).float(), shape=state.shape, code=state.code, blocksize=64,
        quant_type="nf4", dtype=torch.float32,
    )  # fmt: skip
    expected = bnbF.dequantize_4bit(packed, rounded)
    repacked, repacked_state = bnbF._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))
    return expected, repacked, repacked_state


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_reference_reads_the_cpu_packed_layout(nested):
    expected, repacked, state = _cpu_packed(nested)
    assert is_cpu_packed(state)
    assert_bitwise_equal("cpu-packed decode", reference.dequantize_4bit(repacked, state), expected)


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU-packed layout lives on CPU tensors")
def test_triton_path_rejects_the_cpu_packed_layout_clearly():
    _, repacked, state = _cpu_packed(True)
    x = torch.randn(3, 128)
    args = (x, repacked, state, torch.randn(4, 128), torch.randn(64, 4), 1.0)
    with lora_engine.use_backend("triton"), pytest.raises(ValueError, match="packing_format_for_cpu"):
        lora_engine.lora_linear_4bit(*args)
    with lora_engine.use_backend("torch"):
        assert lora_engine.lora_linear_4bit(*args).shape == (3, 64)


def test_module_saves_the_standard_layout_after_cpu_repacking():
    torch.manual_seed(0)
    layer = lora_engine.LoRALinear4bit.from_linear(nn.Linear(128, 64), r=4, compress_statistics=False)
    expected = layer.state_dict()["weight"].clone()
    layer.weight.data, layer.weight.quant_state = bnbF._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    state = layer.state_dict()
    assert not is_cpu_packed(layer.weight.quant_state)
    assert torch.equal(state["weight"], expected)

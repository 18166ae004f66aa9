"""The one-launch dequantize kernel is bitwise equal to bitsandbytes.functional.dequantize_4bit."""

import bitsandbytes.functional as bnbF
import pytest
import torch

from lora_engine.format import BLOCKSIZES, packed_4bit
from lora_engine.kernels.dequantize import dequantize_4bit
from lora_engine.testing import assert_bitwise_equal

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# Odd sizes: blocks straddle rows, rows start mid-byte (odd K), a partial last block, one block bigger than W.
SHAPES = [(37, 100), (5, 333), (64, 128), (3, 4097)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("blocksize", BLOCKSIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_is_bitwise_bitsandbytes(quant_type, nested, blocksize, shape, dtype, kernel_device):
    torch.manual_seed(blocksize + shape[1])
    dense = (torch.randn(shape) * 3).to(dtype).to(kernel_device)
    packed, state = bnbF.quantize_4bit(dense, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    expected = bnbF.dequantize_4bit(packed, state)
    actual = dequantize_4bit(packed_4bit(packed, state), dtype)
    assert_bitwise_equal(f"dequantize {quant_type} nested={nested} bs={blocksize} {shape}", actual, expected)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
def test_quant_storage_is_read_as_bytes(quant_storage, kernel_device):
    dense = torch.randn(19, 64).to(kernel_device)
    packed, state = bnbF.quantize_4bit(dense, blocksize=64, quant_type="nf4", quant_storage=quant_storage)
    assert packed.dtype == quant_storage
    expected = bnbF.dequantize_4bit(packed, state)
    assert_bitwise_equal("quant_storage", dequantize_4bit(packed_4bit(packed, state), torch.float32), expected)


def test_dequantize_writes_into_a_larger_buffer(kernel_device):
    dense = torch.randn(9, 70).to(kernel_device)
    packed, state = bnbF.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
    buffer = torch.full((1000,), float("nan"), device=kernel_device)
    out = dequantize_4bit(packed_4bit(packed, state), torch.float32, out=buffer)
    assert out.shape == (9, 70) and out.data_ptr() == buffer.data_ptr()
    assert_bitwise_equal("into buffer", out, bnbF.dequantize_4bit(packed, state))
    assert buffer[630:].isnan().all(), "wrote past the weight"
    with pytest.raises(ValueError, match="at least 630 elements"):
        dequantize_4bit(packed_4bit(packed, state), torch.float32, out=torch.empty(100, device=kernel_device))

"""Counter-based dropout on the LoRA branch: no mask is stored, it is redrawn from (seed, element index).

Element (m, k) of the flattened [M, K] input is kept when the top 24 bits of Philox-4x32-10
``tl.randint(seed, m * K + k)`` are >= ``threshold`` (``threshold = round(p * 2**24)``), and kept elements
are scaled by ``1 / (1 - p)``. ``lora_engine.reference.dropout_keep_mask`` draws the same bits in torch.
"""

import torch
import triton
import triton.language as tl

from .configs import FUSE_MULTIPLY_ADD, cdiv
from .operands import Dropout

KEEP_BITS: tl.constexpr = tl.constexpr(24)  # random bits compared against the threshold


@triton.jit
def keep_scale(seed, rows, cols, row_stride, threshold, inv_keep_prob):
    """``1 / (1 - p)`` where element (rows[:, None], cols[None, :]) is kept, else 0 (fp32)."""
    offsets = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    bits = tl.randint(seed, offsets) >> (32 - KEEP_BITS)
    return tl.where(bits.to(tl.int32) >= threshold, inv_keep_prob, 0.0)


@triton.jit
def _dropout_scale_kernel(
    T_ptr,
    M, K,
    stride_tm, stride_tk,
    seed, threshold, inv_keep_prob, row_length,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    ptrs = T_ptr + rows.to(tl.int64)[:, None] * stride_tm + cols[None, :] * stride_tk
    t = tl.load(ptrs, mask=mask, other=0.0)
    scale = keep_scale(seed, rows, cols, row_length, threshold, inv_keep_prob)
    tl.store(ptrs, (t.to(tl.float32) * scale).to(t.dtype), mask=mask)


def dropout_scale_(t: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """Multiply the [M, K] tensor ``t`` in place by the dropout keep-scale of ``dropout`` (mask redrawn)."""
    m, k = t.shape
    if m == 0 or k == 0:
        return t
    block_m, block_k = 32, 128  # an elementwise pass: any tile that keeps loads coalesced along K
    grid = (cdiv(m, block_m), cdiv(k, block_k))
    _dropout_scale_kernel[grid](
        t, m, k, t.stride(0), t.stride(1),
        *dropout.kernel_args(),
        BLOCK_M=block_m, BLOCK_K=block_k, enable_fp_fusion=FUSE_MULTIPLY_ADD,
    )  # fmt: skip
    return t

"""Dequantize a bitsandbytes 4-bit weight in one launch: ``out[f] = code[nibble(f)] * absmax[f // blocksize]``.

Nested (double-quantized) absmax is decoded inside the same launch. The product is taken in fp32 and rounded
once to the output dtype, exactly as bitsandbytes does, so the result is bitwise equal to
``bitsandbytes.functional.dequantize_4bit`` (up to the sign of zero, on which bitsandbytes' own CPU and CUDA
kernels disagree). Layout: see ``decode.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import DEQUANT_BLOCK, DEQUANT_BLOCK_INTERPRETER, cdiv, interpreter_active
from .decode import block_scales
from .operands import Packed4bit


@triton.jit
def _dequantize_4bit_kernel(
    W_ptr,
    code_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    Out_ptr,
    numel,
    blocksize2,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
):
    # Each program decodes whole quantization blocks: one scale per row of a [blocks, BLOCKSIZE] tile.
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    pairs = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    packed = tl.load(W_ptr + pairs, mask=pairs < (numel + 1) // 2, other=0).to(tl.int32)
    values = tl.interleave(tl.load(code_ptr + (packed >> 4)), tl.load(code_ptr + (packed & 15)))
    scale = block_scales(
        absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, blocks * BLOCKSIZE < numel, blocksize2, NESTED
    )
    flat = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(Out_ptr + flat, (values * scale[:, None]).to(Out_ptr.dtype.element_ty), mask=flat < numel)


def dequantize_4bit(weight: Packed4bit, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode ``weight`` into a dense [n, k] tensor of ``dtype`` (into ``out`` when given, e.g. a reused buffer)."""
    numel = weight.n * weight.k
    if out is None:
        out = torch.empty((weight.n, weight.k), dtype=dtype, device=weight.data.device)
    elif out.dtype != dtype or out.numel() < numel or not out.is_contiguous():
        raise ValueError(
            f"dequantize_4bit: out must be a contiguous {dtype} tensor of at least {numel} elements, "
            f"got {out.dtype} with {out.numel()} elements (contiguous={out.is_contiguous()})"
        )
    else:
        out = out.view(-1)[:numel].view(weight.n, weight.k)
    if numel == 0:
        return out
    block = DEQUANT_BLOCK_INTERPRETER if interpreter_active() else DEQUANT_BLOCK
    blocks_per_program = max(1, block // weight.blocksize)
    grid = (cdiv(cdiv(numel, weight.blocksize), blocks_per_program),)
    _dequantize_4bit_kernel[grid](
        *weight.kernel_args(),
        out,
        numel,
        weight.blocksize2,
        BLOCKSIZE=weight.blocksize,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        NESTED=weight.nested,
        enable_fp_fusion=False,  # keep bitsandbytes' separate multiply and add for nested absmax
    )
    return out

"""Few-token forward over a 4-bit weight: a GEMV that streams W's packed bytes once, LoRA term and bias fused.

    out[M, N] = x[M, K] · deq(W)ᵀ + scaling · left[M, R] · B[N, R]ᵀ + bias[N]        M ≤ GEMV_MAX_TOKENS
    IA3:        ((x ⊙ s_in[K]) · deq(W)ᵀ + bias) ⊙ s_out[N]                           (one scale, no LoRA term)

The decode regime (one to a few tokens per call) reads W and does almost no arithmetic: a tiled GEMM leaves
most of its tile rows empty, and a dense GEMM reads a 16-bit weight four times the size of the packed one.
Here each program owns BLOCK_N rows of W and walks K: one byte load gives two elements, and each block scale
is loaded once per row per quantization block. All M tokens use the same decoded tile (an [M_PAD, BLOCK_N,
BLOCK_K] broadcast product in fp32), so W is read once whatever M is. ``left = drop(x)·Aᵀ`` arrives
precomputed: it is M x R, a negligible product.

How a byte becomes two codes (``GemvConfig.lookup``; same fp32 bits every way). What each lowers to is
Triton's choice and changes between releases (read off the sm_90 PTX of Triton 3.6 and 3.9):
    table16   one ``tl.gather`` per nibble (two per byte) from the 16 codes as one 1-D table, indexed by the
              flattened nibbles. Both releases stage the 64-byte table in shared memory each K step and read one
              word per nibble. The default: it compiles for every tile on both releases.
    rows16    the same lookup with the 16 codes broadcast to every row ([BLOCK_N, 16]) and gathered along the
              row. Triton 3.9 keeps the gather in registers (warp shuffles and selects per nibble, no shared
              table); Triton 3.6's gather-layout pass fails on some tiles of M_PAD >= 4 (a RuntimeError from
              the compiler at the first launch; ``bench.tune`` records them as errors).
    pairs256  one ``tl.gather`` per byte from a 256-entry table whose entry b packs the fp32 bit patterns of
              (code[b >> 4], code[b & 15]) into one 64-bit word. Every program builds the table from the 16
              codes before its K loop, so it needs no operand, no cache and no per-weight state; the table
              goes through shared memory (2 KiB stored each K step, one 8-byte read per byte).
A table in global memory (read through L1) was the variant of the GEMV probe that lost to a register gather on
an H100 (``ANCHORS.md``), so it is not offered. ``python -m bench.tune --weights gemv`` times the three.

Splitting K (``GemvConfig.split_k`` > 1, for weights with too few row blocks to fill the GPU): program (i, s)
sweeps part s of K for row block i; each part is a whole number of K steps and of quantization blocks, the
last one ending at K. The parts write fp32 partial sums to a workspace [splits, M, N] taken from torch's caching
allocator for the call (so CUDA graphs capture it like any intermediate), and a second kernel adds them in
split order (deterministic: no atomics) and applies the LoRA term, bias and output scale once. split_k = 1 is
one launch without a workspace.

Requires ``K % blocksize == 0`` (no quantization block straddles two rows, so a tile's scales are per row);
``gemv_supported`` says whether a call qualifies. Layout of W: see ``decode.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import FUSE_MULTIPLY_ADD, GEMV_MAX_TOKENS, GemvConfig, cdiv, gemv_config
from .decode import block_scales
from .operands import Packed4bit


@triton.jit
def _gemv_epilogue(
    acc, offs_m, offs_n, m_mask, n_mask,
    Left_ptr, Right_ptr, bias_ptr, Scale_ptr, Out_ptr,
    R, scaling,
    stride_lm, stride_lr,
    stride_rn, stride_rr,
    stride_om, stride_on,
    BLOCK_R: tl.constexpr, LORA: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_SCALE: tl.constexpr,
):  # fmt: skip
    """Add the LoRA term and bias to the fp32 product ``acc`` [M_PAD, BLOCK_N], scale it, store it in out's dtype."""
    if LORA:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + offs_r
            left = tl.load(
                Left_ptr + offs_m[:, None] * stride_lm + rs[None, :] * stride_lr,
                mask=m_mask[:, None] & (rs < R)[None, :],
                other=0.0,
            )
            right = tl.load(
                Right_ptr + offs_n[:, None] * stride_rn + rs[None, :] * stride_rr,
                mask=n_mask[:, None] & (rs < R)[None, :],
                other=0.0,
            )
            acc += scaling * tl.sum(left.to(tl.float32)[:, None, :] * right.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if OUT_SCALE:
        acc = acc * tl.load(Scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = Out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _lora_gemv_4bit_kernel(
    X_ptr, W_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    Left_ptr, Right_ptr, bias_ptr, Scale_ptr, Out_ptr,
    M, N, K, R, blocksize2, scaling, k_split,
    stride_xm, stride_xk,
    stride_lm, stride_lr,
    stride_rn, stride_rr,
    stride_os, stride_om, stride_on,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, LOOKUP: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    offs_pair = tl.arange(0, BLOCK_K // 2)
    if LOOKUP == "pairs256":
        # entry b = (bits of code[b >> 4]) << 32 | bits of code[b & 15]: a byte's two codes in one lookup
        entry = tl.arange(0, 256)
        high = tl.load(code_ptr + (entry >> 4)).to(tl.uint32, bitcast=True).to(tl.uint64)
        low = tl.load(code_ptr + (entry & 15)).to(tl.uint32, bitcast=True).to(tl.uint64)
        pair_table = (high << 32) | low
    elif LOOKUP == "rows16":
        codes = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
    else:
        codes = tl.load(code_ptr + tl.arange(0, 16))
    row_bytes = offs_n.to(tl.int64) * (K // 2)
    blocks_per_row = K // BLOCKSIZE
    x_rows = X_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if SPLIT:
        # this program's part of K: k_split is a multiple of BLOCK_K and of BLOCKSIZE, so the steps and scale
        # blocks fall as in one sweep; the last part ends at K
        k_start = tl.program_id(1) * k_split
        k_end = tl.minimum(k_start + k_split, K)
        Out_ptr += tl.program_id(1).to(tl.int64) * stride_os
    else:
        k_start = 0
        k_end = K

    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        pairs = k0 // 2 + offs_pair
        packed = tl.load(
            W_ptr + row_bytes[:, None] + pairs[None, :], mask=n_mask[:, None] & (pairs < K // 2)[None, :], other=0
        ).to(tl.int32)
        if LOOKUP == "pairs256":
            both = tl.reshape(tl.gather(pair_table, tl.reshape(packed, (BLOCK_N * BLOCK_K // 2,)), axis=0),
                              (BLOCK_N, BLOCK_K // 2))  # fmt: skip
            high_code = (both >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
            low_code = both.to(tl.uint32).to(tl.float32, bitcast=True)
        elif LOOKUP == "rows16":
            high_code = tl.gather(codes, packed >> 4, axis=1)
            low_code = tl.gather(codes, packed & 15, axis=1)
        else:
            flat = tl.reshape(packed, (BLOCK_N * BLOCK_K // 2,))
            high_code = tl.reshape(tl.gather(codes, flat >> 4, axis=0), (BLOCK_N, BLOCK_K // 2))
            low_code = tl.reshape(tl.gather(codes, flat & 15, axis=0), (BLOCK_N, BLOCK_K // 2))
        # high nibble = even element: interleaving the two lookups restores the row order
        values = tl.interleave(high_code, low_code)
        if BLOCK_K > BLOCKSIZE:
            # several whole blocks per step: one scale per (row, block), broadcast over the block's elements
            SCALES: tl.constexpr = BLOCK_K // BLOCKSIZE
            blocks = k0 // BLOCKSIZE + tl.arange(0, SCALES)
            scale_mask = n_mask[:, None] & (blocks < blocks_per_row)[None, :]
            block_idx = offs_n.to(tl.int64)[:, None] * blocks_per_row + blocks[None, :]
            scale = block_scales(
                absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block_idx, scale_mask, blocksize2, NESTED
            )
            values = tl.reshape(
                tl.reshape(values, (BLOCK_N, SCALES, BLOCKSIZE)) * scale[:, :, None], (BLOCK_N, BLOCK_K)
            )
        else:
            # the step lies inside one block of each row (BLOCKSIZE is a multiple of BLOCK_K)
            block_idx = offs_n.to(tl.int64) * blocks_per_row + k0 // BLOCKSIZE
            scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block_idx, n_mask, blocksize2, NESTED)
            values = values * scale[:, None]
        ks = k0 + offs_k
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_mask[:, None] & (ks < K)[None, :], other=0.0)
        if IN_SCALE:
            # rounded once to x's dtype, as the GEMM's prologue and torch's x * l do
            x = (x.to(tl.float32) * tl.load(Scale_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]).to(
                X_ptr.dtype.element_ty
            )
        acc += tl.sum(x.to(tl.float32)[:, None, :] * values[None, :, :], axis=2)

    # split parts store their fp32 partial sums (the launcher passes no LoRA term, bias or output scale)
    _gemv_epilogue(
        acc, offs_m, offs_n, m_mask, n_mask, Left_ptr, Right_ptr, bias_ptr, Scale_ptr, Out_ptr, R, scaling,
        stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on, BLOCK_R, LORA, HAS_BIAS, OUT_SCALE,
    )  # fmt: skip


@triton.jit
def _lora_gemv_reduce_kernel(
    Partial_ptr, Left_ptr, Right_ptr, bias_ptr, Scale_ptr, Out_ptr,
    M, N, R, splits, scaling,
    stride_ps, stride_pm, stride_pn,
    stride_lm, stride_lr,
    stride_rn, stride_rr,
    stride_om, stride_on,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    LORA: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_SCALE: tl.constexpr,
):  # fmt: skip
    """out = epilogue(Σ_s partial[s]) over BLOCK_N columns, the splits added in order (bitwise repeatable)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    m_mask = offs_m < M
    ptrs = Partial_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :] * stride_pn
    mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    _gemv_epilogue(
        acc, offs_m, offs_n, m_mask, n_mask, Left_ptr, Right_ptr, bias_ptr, Scale_ptr, Out_ptr, R, scaling,
        stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on, BLOCK_R, LORA, HAS_BIAS, OUT_SCALE,
    )  # fmt: skip


def gemv_k_split(k: int, blocksize: int, config: GemvConfig) -> tuple[int, int]:
    """``(k_split, splits)``: K elements per part and the number of parts ``config.split_k`` asks of a K-long sweep.

    A part is a whole number of K steps and of quantization blocks, so fewer parts than asked may result (one
    when K holds a single step); every part is non-empty.
    """
    step = max(config.block_k, blocksize)
    k_split = cdiv(cdiv(k, config.split_k), step) * step
    return k_split, cdiv(k, k_split)


def gemv_supported(num_tokens: int, weight: Packed4bit) -> bool:
    """Whether the GEMV serves ``num_tokens`` rows over ``weight`` (few tokens; no block straddles two rows)."""
    return num_tokens <= GEMV_MAX_TOKENS and weight.k % weight.blocksize == 0


def lora_gemv_4bit(
    x: torch.Tensor,
    weight: Packed4bit,
    *,
    right: Optional[torch.Tensor] = None,
    left: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    in_scale: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
    config: Optional[GemvConfig] = None,
) -> torch.Tensor:
    """``x · deq(W)ᵀ + scaling · left · rightᵀ + bias`` in x's dtype, for at most ``GEMV_MAX_TOKENS`` rows of x.

    x: [M, K], any strides. right: [N, R] (B) and left: [M, R] (drop(x)·Aᵀ), both or neither. bias: [N].
    ``in_scale`` ([K]) or ``out_scale`` ([N]), contiguous, scale x's columns before the product or the result's
    columns after the bias (IA3; not with a LoRA term). ``config`` overrides the tiles, lookup and K split
    (``python -m bench.tune``).
    """
    m, k = x.shape
    if k != weight.k:
        raise ValueError(f"lora_gemv_4bit: x is [{m}, {k}] but the weight is [{weight.n}, {weight.k}]")
    if not gemv_supported(m, weight):
        raise ValueError(
            f"lora_gemv_4bit serves at most {GEMV_MAX_TOKENS} rows over a weight whose K ({weight.k}) is a multiple "
            f"of its blocksize ({weight.blocksize}); got {m} rows"
        )
    if (left is None) != (right is None):
        raise ValueError("lora_gemv_4bit: give `left` and `right` together, or neither")
    if (in_scale is not None) + (out_scale is not None) + (right is not None) > 1:
        raise ValueError("lora_gemv_4bit: give at most one of a LoRA term, in_scale and out_scale")
    for name, scale, size in (("in_scale", in_scale, k), ("out_scale", out_scale, weight.n)):
        if scale is not None and (scale.shape != (size,) or scale.stride(0) != 1):
            raise ValueError(f"lora_gemv_4bit: {name} must be a contiguous [{size}] vector, got {tuple(scale.shape)}")
    out = torch.empty((m, weight.n), dtype=x.dtype, device=x.device)
    if m == 0 or weight.n == 0:
        return out
    rank = right.shape[1] if right is not None else 0
    cfg = config or gemv_config(m, rank)
    k_split, splits = gemv_k_split(k, weight.blocksize, cfg)
    dummy = out
    lt, rt = (left, right) if right is not None else (dummy, dummy)
    scale = in_scale if in_scale is not None else (out_scale if out_scale is not None else dummy)
    lora_strides = (
        lt.stride(0) if left is not None else 0, lt.stride(1) if left is not None else 0,
        rt.stride(0) if right is not None else 0, rt.stride(1) if right is not None else 0,
    )  # fmt: skip
    epilogue = dict(LORA=right is not None, HAS_BIAS=bias is not None, OUT_SCALE=out_scale is not None)
    # split parts write fp32 partial sums, one [M, N] slice each, and leave the epilogue to the reduction
    partial = torch.empty((splits, m, weight.n), dtype=torch.float32, device=x.device) if splits > 1 else out
    _lora_gemv_4bit_kernel[(cdiv(weight.n, cfg.block_n), splits)](
        x, *weight.kernel_args(), lt, rt, bias if bias is not None else dummy, scale, partial,
        m, weight.n, k, rank, weight.blocksize2, float(scaling), k_split,
        x.stride(0), x.stride(1), *lora_strides,
        partial.stride(0) if splits > 1 else 0, partial.stride(-2), partial.stride(-1),
        M_PAD=cfg.m_pad, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
        BLOCKSIZE=weight.blocksize, NESTED=weight.nested, IN_SCALE=in_scale is not None,
        LOOKUP=cfg.lookup, SPLIT=splits > 1,
        **(epilogue if splits == 1 else dict(LORA=False, HAS_BIAS=False, OUT_SCALE=False)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FUSE_MULTIPLY_ADD,
    )  # fmt: skip
    if splits > 1:
        block_n = cfg.reduce_block_n
        _lora_gemv_reduce_kernel[(cdiv(weight.n, block_n),)](
            partial, lt, rt, bias if bias is not None else dummy, scale, out,
            m, weight.n, rank, splits, float(scaling),
            partial.stride(0), partial.stride(1), partial.stride(2), *lora_strides,
            out.stride(0), out.stride(1),
            M_PAD=cfg.m_pad, BLOCK_N=block_n, BLOCK_R=cfg.block_r, **epilogue,
            num_warps=4, enable_fp_fusion=FUSE_MULTIPLY_ADD,
        )  # fmt: skip
    return out

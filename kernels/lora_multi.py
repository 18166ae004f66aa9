"""The low-rank term of a mixed batch: every row of x carries its own LoRA adapter (or none).

    shrink:  left[p, :]  = x[rows[p]] · A[a]ᵀ                      (fp32 out, [M, R_MAX], p in sorted order)
    expand:  y[rows[p]] += s[a] · left[p] · B[a]ᵀ                  (in place; rows of no adapter untouched)

with ``a`` the adapter of row ``rows[p]``. Rows are grouped by adapter (``rows``: the row indices of x sorted by
adapter, ``segment_metadata``), as Punica, S-LoRA and vLLM group them, so each program reads one adapter's
factors. Layouts: x [M, K] and y [M, N] any strides; A stacked [n_adapters, R_MAX, K], B stacked
[n_adapters, N, R_MAX], both zero-padded to R_MAX, the largest rank (padded ranks add exact zeros); scalings fp32
[n_adapters]. Programs run over (row blocks, column blocks): ``block_adapter[g]``, ``block_start[g]`` and
``block_end[g]`` give row block g's adapter (-1: no work) and its range of sorted positions. The grid has
``cdiv(M, BLOCK_M) + n_adapters`` row blocks, an upper bound of what the segments need, so the metadata stays
on the device (no host sync). Products take x's dtype and accumulate in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .configs import FUSE_MULTIPLY_ADD, cdiv, dot_precision, multi_lora_config, rank_block


class Segments(NamedTuple):
    """Rows of a mixed batch grouped by adapter, and the row blocks the kernels run over (all on x's device)."""

    rows: torch.Tensor  # int64 [M]: row indices sorted by adapter (stable), rows of no adapter last
    block_adapter: torch.Tensor  # int32 [blocks]: adapter of each row block, -1 for blocks with no work
    block_start: torch.Tensor  # int32 [blocks]: first sorted position of the block
    block_end: torch.Tensor  # int32 [blocks]: end of the block's segment (positions past it are masked)
    block_m: int


def segment_metadata(indices: torch.Tensor, num_adapters: int, block_m: int) -> Segments:
    """Group the rows by adapter: ``indices`` int [M] with values in [-1, num_adapters) (-1: no adapter).

    Torch operations on the device (argsort, bincount, cumsum, searchsorted); nothing is read back to the host.
    """
    m = indices.shape[0]
    device = indices.device
    key = torch.where(indices < 0, num_adapters, indices).to(torch.int64)  # rows of no adapter sort last
    rows = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_adapters + 1)[:num_adapters]
    starts = torch.cumsum(counts, 0) - counts
    blocks = (counts + block_m - 1) // block_m  # row blocks of each adapter's segment
    block_ends = torch.cumsum(blocks, 0)
    grid_blocks = cdiv(max(m, 1), block_m) + num_adapters  # >= sum(blocks): each segment adds at most one partial
    g = torch.arange(grid_blocks, device=device)
    adapter = torch.searchsorted(block_ends, g, right=True)  # the segment holding row block g
    has_work = adapter < num_adapters
    a = adapter.clamp_max(num_adapters - 1)
    first_block = block_ends[a] - blocks[a]
    block_start = starts[a] + (g - first_block) * block_m
    block_end = starts[a] + counts[a]
    block_adapter = torch.where(has_work, a, -1)
    return Segments(
        rows, block_adapter.to(torch.int32), block_start.to(torch.int32), block_end.to(torch.int32), block_m
    )


@triton.jit
def _multi_lora_shrink_kernel(
    X_ptr, A_ptr, Left_ptr, Rows_ptr, BlockAdapter_ptr, BlockStart_ptr, BlockEnd_ptr,
    K, R_MAX,
    stride_xm, stride_xk, stride_aa, stride_ar, stride_ak, stride_lm, stride_lr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_g = tl.program_id(0)
    pid_r = tl.program_id(1)
    adapter = tl.load(BlockAdapter_ptr + pid_g)
    if adapter < 0:  # a row block the segments did not need
        return
    start = tl.load(BlockStart_ptr + pid_g)
    end = tl.load(BlockEnd_ptr + pid_g)
    dtype = X_ptr.dtype.element_ty
    offs_p = start + tl.arange(0, BLOCK_M)
    p_mask = offs_p < end
    rows = tl.load(Rows_ptr + offs_p, mask=p_mask, other=0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R_MAX
    offs_k = tl.arange(0, BLOCK_K)
    a_base = A_ptr + adapter.to(tl.int64) * stride_aa
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        x = tl.load(
            X_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=p_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        a = tl.load(  # Aᵀ tile [BLOCK_K, BLOCK_R]
            a_base + ks[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(x, a.to(dtype), acc, input_precision=DOT_PRECISION)
    tl.store(
        Left_ptr + offs_p.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
        acc,
        mask=p_mask[:, None] & r_mask[None, :],
    )


@triton.jit
def _multi_lora_expand_kernel(
    Left_ptr, B_ptr, Scale_ptr, Y_ptr, Rows_ptr, BlockAdapter_ptr, BlockStart_ptr, BlockEnd_ptr,
    N, R_MAX,
    stride_lm, stride_lr, stride_ba, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter = tl.load(BlockAdapter_ptr + pid_g)
    if adapter < 0:
        return
    start = tl.load(BlockStart_ptr + pid_g)
    end = tl.load(BlockEnd_ptr + pid_g)
    dtype = Y_ptr.dtype.element_ty
    offs_p = start + tl.arange(0, BLOCK_M)
    p_mask = offs_p < end
    rows = tl.load(Rows_ptr + offs_p, mask=p_mask, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    b_base = B_ptr + adapter.to(tl.int64) * stride_ba
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R_MAX, BLOCK_R):  # ranks above the rank tile loop over chunks
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R_MAX
        left = tl.load(
            Left_ptr + offs_p.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
            mask=p_mask[:, None] & r_mask[None, :],
            other=0.0,
        ).to(dtype)  # rounded to the activations' dtype, as the single-adapter GEMM's epilogue reads it
        b = tl.load(  # Bᵀ tile [BLOCK_R, BLOCK_N]
            b_base + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(left, b.to(dtype), acc, input_precision=DOT_PRECISION)
    scale = tl.load(Scale_ptr + adapter)
    y_ptrs = Y_ptr + rows.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = p_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    # each (row, column) belongs to exactly one program: a plain read-modify-write, no atomics
    tl.store(y_ptrs, (y + scale * acc).to(dtype), mask=mask)


def multi_lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``left[p] = x[rows[p]] · A[a]ᵀ`` as fp32 [M, R_MAX] in sorted order; x: [M, K], lora_A: [n, R_MAX, K]."""
    m, k = x.shape
    if lora_A.dim() != 3 or lora_A.shape[2] != k:
        raise ValueError(f"multi_lora_shrink: x is [{m}, {k}] but the stacked A is {list(lora_A.shape)}")
    r_max = lora_A.shape[1]
    left = torch.zeros((m, r_max), dtype=torch.float32, device=x.device)  # rows of no adapter stay zero
    if m == 0:
        return left
    cfg = multi_lora_config(m)
    block_r = rank_block(r_max)
    grid = (segments.block_adapter.shape[0], cdiv(r_max, block_r))
    _multi_lora_shrink_kernel[grid](
        x, lora_A, left, segments.rows, segments.block_adapter, segments.block_start, segments.block_end,
        k, r_max,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), left.stride(0), left.stride(1),
        BLOCK_M=segments.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FUSE_MULTIPLY_ADD,
    )  # fmt: skip
    return left


def multi_lora_expand(
    y: torch.Tensor, left: torch.Tensor, lora_B: torch.Tensor, scalings: torch.Tensor, segments: Segments
) -> torch.Tensor:
    """``y[rows[p]] += s[a] · left[p] · B[a]ᵀ`` in place and returned; y: [M, N], left: fp32 [M, R_MAX] (sorted
    order), lora_B: [n, N, R_MAX], scalings: fp32 [n]."""
    m, n = y.shape
    if lora_B.dim() != 3 or lora_B.shape[1] != n or lora_B.shape[2] != left.shape[1]:
        raise ValueError(
            f"multi_lora_expand: y is [{m}, {n}], left {list(left.shape)}, the stacked B {list(lora_B.shape)}"
        )
    if scalings.dtype != torch.float32 or scalings.shape != (lora_B.shape[0],):
        raise ValueError(f"multi_lora_expand: scalings must be fp32 [{lora_B.shape[0]}], got {scalings.dtype} "
                         f"{list(scalings.shape)}")  # fmt: skip
    if m == 0:
        return y
    cfg = multi_lora_config(m)
    r_max = lora_B.shape[2]
    block_r = rank_block(r_max)
    grid = (segments.block_adapter.shape[0], cdiv(n, cfg.block_n))
    _multi_lora_expand_kernel[grid](
        left, lora_B, scalings, y, segments.rows, segments.block_adapter, segments.block_start, segments.block_end,
        n, r_max,
        left.stride(0), left.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), y.stride(0),
        y.stride(1),
        BLOCK_M=segments.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, DOT_PRECISION=dot_precision(y.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FUSE_MULTIPLY_ADD,
    )  # fmt: skip
    return y

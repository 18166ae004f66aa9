"""The rank-r products of the LoRA branch, each reading its large operand once.

    down:    left[M, R]  = drop(a)[M, K] · down[K, R]                  (forward: x·Aᵀ; fp32 out)
    dy pass: dyB[M, R]   = dy[M, N] · B[N, R]                          (fp32 out)
             dB[N, R]    = scaling · dy[M, N]ᵀ · left[M, R]             (same pass over dy; fp32 out)
    dA:      dA[R, K]    = scaling · dyB[M, R]ᵀ · drop(x)[M, K]         (fp32 out)

Reductions over the long M axis are split across programs when that is needed to fill the GPU; the partial
sums then meet through fp32 atomics into zero-initialised outputs. Products take the activations' dtype and
accumulate in fp32, like the GEMM kernel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .configs import (
    FUSE_MULTIPLY_ADD, LowRankConfig, cdiv, dot_precision, interpreter_active, lowrank_config, rank_block,
)
from .dropout import keep_scale
from .operands import NO_DROPOUT_ARGS, Dropout

_NO_DROPOUT = NO_DROPOUT_ARGS[:3]  # (seed, threshold, inv_keep_prob): the kernels here take no row length


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _cached_sm_count(device.index if device.index is not None else torch.cuda.current_device())


_SM_COUNT: dict[int, int] = {}


def _cached_sm_count(index: int) -> int:
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _split_rows(m: int, block_m: int, programs: int, sms: int, split_m: Optional[int]) -> tuple[int, int]:
    """Split M into ranges (whole BLOCK_M tiles) so the grid has about two programs per SM (``sms`` of them).

    Returns ``(rows_per_split, splits)``; ``splits`` is 0 when M is 0. The interpreter uses one range unless
    ``split_m`` asks for more.
    """
    if split_m is None:
        split_m = 1 if interpreter_active() else cdiv(2 * sms, programs)
    split_m = max(1, min(split_m, cdiv(m, block_m)))
    rows_per_split = cdiv(cdiv(max(m, 1), split_m), block_m) * block_m
    return rows_per_split, cdiv(m, rows_per_split)


class _ReductionTiles(NamedTuple):
    """The launch geometry of a rank-r product reduced over M (``lora_dy_pass``, ``lora_da``)."""

    cfg: LowRankConfig
    block_r: int
    rows_per_split: int
    splits: int
    grid: tuple[int, int, int]


@functools.lru_cache(maxsize=4096)  # called per launch; a pure function of its arguments and the mode
def _reduction_tiles(
    m: int, length: int, rank: int, sms: int, split_m: Optional[int], config: Optional[LowRankConfig]
) -> _ReductionTiles:
    """Tiles, M split and grid for a product over ``m`` rows with a ``length`` x ``rank`` output, on a device with
    ``sms`` multiprocessors."""
    cfg = config or lowrank_config(m)
    block_r = rank_block(rank)
    programs = cdiv(length, cfg.block_k) * cdiv(rank, block_r)
    rows_per_split, splits = _split_rows(m, cfg.block_m, programs, sms, split_m)
    grid = (cdiv(length, cfg.block_k), cdiv(rank, block_r), splits)
    return _ReductionTiles(cfg, block_r, rows_per_split, splits, grid)


@triton.jit
def _lora_down_kernel(
    A_ptr, Down_ptr, Left_ptr,
    M, K, R,
    seed, drop_threshold, inv_keep_prob,
    stride_am, stride_ak, stride_dk, stride_dr, stride_lm, stride_lr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    dtype = A_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        a = tl.load(
            A_ptr + offs_m.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if DROPOUT:
            a = (a * keep_scale(seed, offs_m, ks, K, drop_threshold, inv_keep_prob)).to(dtype)
        down = tl.load(
            Down_ptr + ks[:, None] * stride_dk + offs_r[None, :] * stride_dr,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, down.to(dtype), acc, input_precision=DOT_PRECISION)
    tl.store(
        Left_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
        acc,
        mask=m_mask[:, None] & r_mask[None, :],
    )


@triton.jit
def _lora_dy_kernel(
    DY_ptr, B_ptr, Left_ptr, DYB_ptr, DB_ptr,
    M, N, R, rows_per_split,
    scaling,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_lm, stride_lr, stride_dybm, stride_dybr,
    stride_dbn, stride_dbr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ATOMIC_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    dtype = DY_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_mask = offs_n < N
    r_mask = offs_r < R
    b = tl.load(
        B_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=n_mask[:, None] & r_mask[None, :],
        other=0.0,
    ).to(dtype)
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = min(M, m_start + rows_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        dy = tl.load(
            DY_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        left = tl.load(
            Left_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        ).to(dtype)
        db = tl.dot(tl.trans(dy), left, db, input_precision=DOT_PRECISION)
        dyb = tl.dot(dy, b, input_precision=DOT_PRECISION)
        # Every column tile of dy contributes to the same dyB rows.
        tl.atomic_add(
            DYB_ptr + offs_m.to(tl.int64)[:, None] * stride_dybm + offs_r[None, :] * stride_dybr,
            dyb,
            mask=m_mask[:, None] & r_mask[None, :],
        )
    db_ptrs = DB_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
    if ATOMIC_DB:
        tl.atomic_add(db_ptrs, scaling * db, mask=n_mask[:, None] & r_mask[None, :])
    else:
        tl.store(db_ptrs, scaling * db, mask=n_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_da_kernel(
    DYB_ptr, X_ptr, DA_ptr,
    M, K, R, rows_per_split,
    scaling, seed, drop_threshold, inv_keep_prob,
    stride_dybm, stride_dybr, stride_xm, stride_xk, stride_dar, stride_dak,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DROPOUT: tl.constexpr, ATOMIC_DA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    dtype = X_ptr.dtype.element_ty
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = min(M, m_start + rows_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        dyb = tl.load(
            DYB_ptr + offs_m.to(tl.int64)[:, None] * stride_dybm + offs_r[None, :] * stride_dybr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        ).to(dtype)
        x = tl.load(
            X_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if DROPOUT:
            x = (x * keep_scale(seed, offs_m, offs_k, K, drop_threshold, inv_keep_prob)).to(dtype)
        acc = tl.dot(tl.trans(dyb), x, acc, input_precision=DOT_PRECISION)
    da_ptrs = DA_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
    if ATOMIC_DA:
        tl.atomic_add(da_ptrs, scaling * acc, mask=r_mask[:, None] & k_mask[None, :])
    else:
        tl.store(da_ptrs, scaling * acc, mask=r_mask[:, None] & k_mask[None, :])


def lora_down(
    a: torch.Tensor,
    down: torch.Tensor,
    dropout: Optional[Dropout] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[LowRankConfig] = None,
) -> torch.Tensor:
    """``drop(a) · down`` as fp32 [M, R]; a: [M, K], down: [K, R] (any strides, e.g. ``lora_A.t()``)."""
    m, k = a.shape
    rank = down.shape[1]
    if down.shape[0] != k:
        raise ValueError(f"lora_down: a is [{m}, {k}] but down is {list(down.shape)}")
    if out is None:
        out = torch.empty((m, rank), dtype=torch.float32, device=a.device)
    if m == 0:
        return out
    cfg = config or lowrank_config(m)
    block_r = rank_block(rank)
    drop_args = dropout.kernel_args()[:3] if dropout is not None else _NO_DROPOUT
    grid = (cdiv(m, cfg.block_m), cdiv(rank, block_r))
    _lora_down_kernel[grid](
        a, down, out,
        m, k, rank,
        *drop_args,
        *a.stride(), *down.stride(), *out.stride(),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
        DROPOUT=dropout is not None, DOT_PRECISION=dot_precision(a.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FUSE_MULTIPLY_ADD,
    )  # fmt: skip
    return out


def lora_dy_pass(
    dy: torch.Tensor,
    lora_B: torch.Tensor,
    left: torch.Tensor,
    scaling: float,
    split_m: Optional[int] = None,
    config: Optional[LowRankConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over dy [M, N]: returns ``(dy·B, scaling·dyᵀ·left)`` as fp32 [M, R] and [N, R]."""
    m, n = dy.shape
    rank = lora_B.shape[1]
    device = dy.device
    dyb = torch.zeros((m, rank), dtype=torch.float32, device=device)
    cfg, block_r, rows_per_split, splits, grid = _reduction_tiles(m, n, rank, _num_sms(device), split_m, config)
    db = (torch.zeros if splits != 1 else torch.empty)((n, rank), dtype=torch.float32, device=device)
    if m == 0:
        return dyb, db
    _lora_dy_kernel[grid](
        dy, lora_B, left, dyb, db,
        m, n, rank, rows_per_split,
        float(scaling),
        *dy.stride(), *lora_B.stride(), *left.stride(),
        *dyb.stride(), *db.stride(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_k, BLOCK_R=block_r,
        ATOMIC_DB=splits > 1, DOT_PRECISION=dot_precision(dy.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FUSE_MULTIPLY_ADD,
    )  # fmt: skip
    return dyb, db


def lora_da(
    dyb: torch.Tensor,
    x: torch.Tensor,
    scaling: float,
    dropout: Optional[Dropout] = None,
    split_m: Optional[int] = None,
    config: Optional[LowRankConfig] = None,
) -> torch.Tensor:
    """``scaling · dyBᵀ · drop(x)`` as fp32 [R, K]; dyb: [M, R], x: [M, K]."""
    m, k = x.shape
    rank = dyb.shape[1]
    device = x.device
    cfg, block_r, rows_per_split, splits, grid = _reduction_tiles(m, k, rank, _num_sms(device), split_m, config)
    da = (torch.zeros if splits != 1 else torch.empty)((rank, k), dtype=torch.float32, device=device)
    if m == 0:
        return da
    drop_args = dropout.kernel_args()[:3] if dropout is not None else _NO_DROPOUT
    _lora_da_kernel[grid](
        dyb, x, da,
        m, k, rank, rows_per_split,
        float(scaling), *drop_args,
        *dyb.stride(), *x.stride(), *da.stride(),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
        DROPOUT=dropout is not None, ATOMIC_DA=splits > 1, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FUSE_MULTIPLY_ADD,
    )  # fmt: skip
    return da

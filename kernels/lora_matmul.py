"""GEMM over a frozen weight with the LoRA term in its epilogue.

    out[M, N_out] = a[M, K_red] · op(W) + scaling · keep ⊙ (left[M, R] · right[N_out, R]ᵀ) + bias[N_out]
    IA3 scales:     out = ((a ⊙ s_in[K_red]) · op(W) + bias) ⊙ s_out[N_out]        (each optional, no LoRA term)
    DoRA:           out = (a · op(W) + scaling · left · rightᵀ) ⊙ s_out + bias      (SCALE_BIAS off)

One kernel serves every dense-and-LoRA product of the layer:
  forward    a = x,  op(W) = deq(W)ᵀ (W is [N_out, K_red]), left = drop(x)·Aᵀ, right = B, + bias
  input grad a = dy, op(W) = deq(W)  (W is [K_red, N_out]), left = dy·B, right = Aᵀ, keep = the dropout mask
  IA3        the per-feature scale in the prologue (scaled input, ``s_in``) or the epilogue (scaled output,
             ``s_out``): the forward of either IA3 layer, and the input gradient of the output-scaled one
W is either bitsandbytes 4-bit, decoded tile by tile inside the K loop (no dense copy of W is made), or a
dense tensor (the dequantize-to-buffer path for large M, and unquantized bases). ``left`` is read from
memory, or accumulated inside the same K loop as ``a · down`` (``down`` is [K_red, R]) and optionally
written out for the backward pass. Accumulation is fp32; products take a's dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl

from .configs import FUSE_MULTIPLY_ADD, MatmulConfig, cdiv, dot_precision, matmul_config, rank_block
from .decode import decode_4bit_tile
from .dropout import keep_scale
from .operands import NO_DROPOUT_ARGS, Dropout, Packed4bit

IN_LOOP_RANK_LIMIT = 64  # largest rank whose left factor is accumulated in registers inside the K loop


class _Tiles(NamedTuple):
    """The launch geometry of one :func:`lora_matmul` call."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int
    group_m: int
    num_warps: int
    num_stages: int
    scale_per_row: bool
    split_k: int
    k_per_split: int
    grid: tuple[int, int]


@functools.lru_cache(maxsize=4096)  # called per launch; a pure function of its arguments and the mode
def _tiles(
    m: int, n_out: int, k_red: int, dtype: torch.dtype, w_k: int, blocksize: int, weight_out_by_in: bool, rank: int,
    left_in_loop: bool, config: Optional[MatmulConfig],
) -> _Tiles:
    """Tiles, pipeline depth, K split and grid for an [m, k_red] x [k_red, n_out] product; ``w_k`` and ``blocksize``
    are the 4-bit weight's K and quantization blocksize (0 for a dense weight)."""
    cfg = config or matmul_config(m, n_out, k_red, dtype)
    block_m, block_n, block_k = cfg.block_m, cfg.block_n, cfg.block_k
    is_4bit = blocksize > 0
    scale_per_row = False
    if is_4bit and w_k % blocksize == 0:
        # Tiles along W's columns must sit inside one quantization block to take one scale per row.
        if weight_out_by_in:
            block_k = min(block_k, blocksize)
        else:
            block_n = min(block_n, blocksize)
        scale_per_row = True
    num_stages = cfg.num_stages
    if is_4bit and not scale_per_row:
        # Per-element scale gathers (blocks straddle rows) are staged in shared memory by the pipeliner for
        # every stage; two stages keep the tile within the shared memory of every target.
        num_stages = min(num_stages, 2)
    block_r = rank_block(rank, cap=IN_LOOP_RANK_LIMIT if left_in_loop else 64)
    # Split K only where the left factor is not accumulated in the loop (each split sees part of K).
    split_k = 1 if left_in_loop else max(1, min(cfg.split_k, cdiv(k_red, block_k)))
    k_per_split = cdiv(cdiv(k_red, split_k), block_k) * block_k
    split_k = cdiv(k_red, k_per_split)
    grid = (cdiv(m, block_m) * cdiv(n_out, block_n), split_k)
    return _Tiles(block_m, block_n, block_k, block_r, cfg.group_m, cfg.num_warps, num_stages, scale_per_row, split_k,
                  k_per_split, grid)  # fmt: skip


@triton.jit
def _weight_tile(
    W_ptr,
    code_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    rows,
    col0,
    W_rows,
    W_cols,
    stride_wr,
    stride_wc,
    blocksize2,
    BLOCK_COLS: tl.constexpr,
    W_4BIT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    PAIRED: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """W[rows, col0 : col0 + BLOCK_COLS] in DTYPE, zero outside W."""
    if W_4BIT:
        tile = decode_4bit_tile(
            W_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, col0, W_rows, W_cols,
            blocksize2, BLOCKSIZE, BLOCK_COLS, NESTED, PAIRED, SCALE_PER_ROW,
        )
    else:
        cols = col0 + tl.arange(0, BLOCK_COLS)
        mask = (rows < W_rows)[:, None] & (cols < W_cols)[None, :]
        tile = tl.load(
            W_ptr + rows.to(tl.int64)[:, None] * stride_wr + cols[None, :] * stride_wc, mask=mask, other=0.0
        )
    return tile.to(DTYPE)


@triton.jit
def _lora_matmul_kernel(
    A_ptr, W_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    Down_ptr, Left_ptr, Right_ptr, bias_ptr, Scale_ptr, Out_ptr,
    M, N_out, K_red, R, W_rows, W_cols, blocksize2, k_per_split,
    scaling, seed, drop_threshold, inv_keep_prob, drop_row_length,
    stride_am, stride_ak,
    stride_wr, stride_wc,
    stride_dk, stride_dr,
    stride_lm, stride_lr,
    stride_rn, stride_rr,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    W_4BIT: tl.constexpr, W_OUT_BY_IN: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    PAIRED: tl.constexpr, SCALE_PER_ROW: tl.constexpr,
    LORA: tl.constexpr, LEFT_IN_LOOP: tl.constexpr, STORE_LEFT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
    IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, SCALE_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # Grouped ordering: GROUP_M row panels of `a` stay hot in L2 while the N tiles sweep over them.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_out, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    dtype = A_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N_out
    a_rows = A_ptr + offs_m.to(tl.int64)[:, None] * stride_am

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    left = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # With SPLIT_K > 1, program (pid, pid_k) reduces K range [pid_k, pid_k + 1) * k_per_split only; the
    # first split adds the LoRA term and bias, and all of them add into a zeroed fp32 output.
    pid_k = tl.program_id(1)
    k_start = pid_k * k_per_split
    k_stop = min(K_red, k_start + k_per_split)
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = k0 + offs_k
        if EVEN_K:
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=m_mask[:, None], other=0.0)
        else:
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=m_mask[:, None] & (ks < K_red)[None, :], other=0.0)
        if IN_SCALE:
            # the scale multiplies in fp32, rounded once to the product's dtype (as torch's x * l would)
            s_in = tl.load(Scale_ptr + ks, mask=ks < K_red, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * s_in[None, :]).to(dtype)
        if W_OUT_BY_IN:
            w = _weight_tile(
                W_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k0, W_rows, W_cols,
                stride_wr, stride_wc, blocksize2, BLOCK_K, W_4BIT, BLOCKSIZE, NESTED, PAIRED, SCALE_PER_ROW, dtype,
            )
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            w = _weight_tile(
                W_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, ks, pid_n * BLOCK_N, W_rows,
                W_cols, stride_wr, stride_wc, blocksize2, BLOCK_N, W_4BIT, BLOCKSIZE, NESTED, PAIRED,
                SCALE_PER_ROW, dtype,
            )
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if LEFT_IN_LOOP:
            down = tl.load(
                Down_ptr + ks[:, None] * stride_dk + offs_r[None, :] * stride_dr,
                mask=(ks < K_red)[:, None] & (offs_r < R)[None, :],
                other=0.0,
            )
            left = tl.dot(a, down.to(dtype), left, input_precision=DOT_PRECISION)

    if LORA and pid_k == 0:
        if LEFT_IN_LOOP:
            if STORE_LEFT:
                # Only the first column of tiles writes the [M, R] factor the backward pass reuses.
                if pid_n == 0:
                    tl.store(
                        Left_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                        left,
                        mask=m_mask[:, None] & (offs_r < R)[None, :],
                    )
            right = tl.load(
                Right_ptr + offs_n[None, :] * stride_rn + offs_r[:, None] * stride_rr,
                mask=n_mask[None, :] & (offs_r < R)[:, None],
                other=0.0,
            )
            lora = tl.dot(left.to(dtype), right.to(dtype), input_precision=DOT_PRECISION)
        else:
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rs = r0 + offs_r
                left_tile = tl.load(
                    Left_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + rs[None, :] * stride_lr,
                    mask=m_mask[:, None] & (rs < R)[None, :],
                    other=0.0,
                )
                right = tl.load(
                    Right_ptr + offs_n[None, :] * stride_rn + rs[:, None] * stride_rr,
                    mask=n_mask[None, :] & (rs < R)[:, None],
                    other=0.0,
                )
                lora = tl.dot(left_tile.to(dtype), right.to(dtype), lora, input_precision=DOT_PRECISION)
        if DROPOUT:
            lora = lora * keep_scale(seed, offs_m, offs_n, drop_row_length, drop_threshold, inv_keep_prob)
        acc += scaling * lora
    # The output scale is linear, so split-K partials may each take it. IA3 scales the base layer's whole output
    # (bias included, SCALE_BIAS); DoRA scales the weight's product and LoRA term, then adds the bias.
    if OUT_SCALE and not SCALE_BIAS:
        acc = acc * tl.load(Scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS and pid_k == 0:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if OUT_SCALE and SCALE_BIAS:
        acc = acc * tl.load(Scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    out_ptrs = Out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def lora_matmul(
    a: torch.Tensor,
    weight: Union[Packed4bit, torch.Tensor],
    *,
    weight_out_by_in: bool,
    right: Optional[torch.Tensor] = None,
    left: Optional[torch.Tensor] = None,
    down: Optional[torch.Tensor] = None,
    left_out: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    dropout: Optional[Dropout] = None,
    in_scale: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
    scale_bias: bool = True,
    out: Optional[torch.Tensor] = None,
    config: Optional[MatmulConfig] = None,
) -> torch.Tensor:
    """``a · op(W) + scaling · keep ⊙ (left · rightᵀ) + bias`` in a's dtype.

    a: [M, K_red], any strides. weight: ``Packed4bit`` or a dense tensor; ``weight_out_by_in`` says it is
    [N_out, K_red] (op = transpose, the forward) rather than [K_red, N_out] (the input gradient).
    right: [N_out, R] or None for no LoRA term. The left factor is either given ([M, R], fp32) or, with
    ``down`` ([K_red, R], any strides), accumulated in the K loop as ``a · down`` and written to
    ``left_out`` when given. ``dropout`` multiplies the LoRA term by the keep mask of element (m, n).
    ``in_scale`` ([K_red], contiguous) scales a's columns before the product; ``out_scale`` ([N_out], contiguous)
    scales the result's columns after the bias, or before it when ``scale_bias`` is False (DoRA, where it also
    scales the LoRA term). ``in_scale`` does not combine with a LoRA term.
    """
    m, k_red = a.shape
    is_4bit = isinstance(weight, Packed4bit)
    w_rows, w_cols = (weight.n, weight.k) if is_4bit else tuple(weight.shape)
    n_out = w_rows if weight_out_by_in else w_cols
    if (w_cols if weight_out_by_in else w_rows) != k_red:
        raise ValueError(f"lora_matmul: a is [{m}, {k_red}] but the weight is [{w_rows}, {w_cols}]")
    if (left is not None) + (down is not None) != (right is not None):
        raise ValueError("lora_matmul: give `right` with exactly one of `left` or `down`")
    if in_scale is not None and right is not None:
        raise ValueError("lora_matmul: an input scale does not combine with a LoRA term")
    if in_scale is not None and out_scale is not None:
        raise ValueError("lora_matmul: give in_scale or out_scale, not both (the kernel reads one scale vector)")
    for name, scale, size in (("in_scale", in_scale, k_red), ("out_scale", out_scale, n_out)):
        if scale is not None and (scale.shape != (size,) or scale.stride(0) != 1):
            raise ValueError(f"lora_matmul: {name} must be a contiguous [{size}] vector, got {tuple(scale.shape)}")
    rank = right.shape[1] if right is not None else 0
    if out is None:
        out = torch.empty((m, n_out), dtype=a.dtype, device=a.device)
    if m == 0 or n_out == 0:
        return out

    left_in_loop = down is not None
    if left_in_loop and rank > IN_LOOP_RANK_LIMIT:
        raise ValueError(f"lora_matmul: an in-loop left factor supports rank <= {IN_LOOP_RANK_LIMIT}, got {rank}")
    cfg = _tiles(m, n_out, k_red, a.dtype, weight.k if is_4bit else 0, weight.blocksize if is_4bit else 0,
                 weight_out_by_in, rank, left_in_loop, config)  # fmt: skip
    block_m, block_n, block_k, block_r = cfg.block_m, cfg.block_n, cfg.block_k, cfg.block_r
    num_stages, scale_per_row, split_k, k_per_split = cfg.num_stages, cfg.scale_per_row, cfg.split_k, cfg.k_per_split
    blocksize = weight.blocksize if is_4bit else 64

    dummy = out
    if is_4bit:
        w_args = weight.kernel_args()
        stride_wr = stride_wc = 0
    else:
        w_args = (weight, dummy, dummy, dummy, dummy, dummy)
        stride_wr, stride_wc = weight.stride()
    lb = right if right is not None else dummy
    lb_strides = right.stride() if right is not None else (0, 0)
    lt = left if left is not None else (left_out if left_out is not None else dummy)
    lt_strides = lt.stride() if lt is not dummy else (0, 0)
    dn = down if down is not None else dummy
    dn_strides = down.stride() if down is not None else (0, 0)
    drop_args = dropout.kernel_args() if dropout is not None else NO_DROPOUT_ARGS

    target = out
    if split_k > 1:
        target = out if out.dtype == torch.float32 and out.is_contiguous() else torch.empty(
            (m, n_out), dtype=torch.float32, device=a.device
        )
        target.zero_()
    _lora_matmul_kernel[cfg.grid](
        a, *w_args, dn, lt, lb, bias if bias is not None else dummy,
        in_scale if in_scale is not None else (out_scale if out_scale is not None else dummy), target,
        m, n_out, k_red, rank, w_rows, w_cols, weight.blocksize2 if is_4bit else 0, k_per_split,
        float(scaling), *drop_args,
        *a.stride(),
        stride_wr, stride_wc,
        dn_strides[0], dn_strides[1],
        lt_strides[0], lt_strides[1],
        lb_strides[0], lb_strides[1],
        *target.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=cfg.group_m,
        W_4BIT=is_4bit, W_OUT_BY_IN=weight_out_by_in, BLOCKSIZE=blocksize,
        NESTED=is_4bit and weight.nested, PAIRED=is_4bit and weight.k % 2 == 0, SCALE_PER_ROW=scale_per_row,
        LORA=right is not None, LEFT_IN_LOOP=left_in_loop, STORE_LEFT=left_in_loop and left_out is not None,
        HAS_BIAS=bias is not None, DROPOUT=dropout is not None, EVEN_K=k_red % block_k == 0, SPLIT_K=split_k,
        IN_SCALE=in_scale is not None, OUT_SCALE=out_scale is not None, SCALE_BIAS=scale_bias,
        DOT_PRECISION=dot_precision(a.dtype),
        num_warps=cfg.num_warps, num_stages=num_stages, enable_fp_fusion=FUSE_MULTIPLY_ADD,
    )  # fmt: skip
    if target is not out:
        out.copy_(target)
    return out

"""The autograd function over the Triton kernels: forward and the three gradients of the LoRA layer.

    forward  y  = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias          saves x, A, B and left = drop(x)·Aᵀ (M x r)
    backward dyB = dy·B,  dB = s·dyᵀ·left                   one pass over dy
             dx = dy·W + s·keep ⊙ (dyB·A)                   GEMM with the LoRA term in its epilogue
             dA = s·dyBᵀ·drop(x)                            one pass over x, dropout mask redrawn
W is frozen (4-bit ``Packed4bit`` or a dense tensor) and gets no gradient.

Paths for a 4-bit W: "fused" decodes W inside the GEMM's K loop; "dequant" decodes it once per call into a
fresh buffer and runs the same Triton GEMM with the LoRA epilogue; "dequant_cublas" decodes the same way
but runs the big product on cuBLAS (``torch.addmm``) with the LoRA term as its C operand; "gemv" (at most
``GEMV_MAX_TOKENS`` rows) streams the packed bytes once through a GEMV with the LoRA term and bias fused, and
its backward takes the "dequant" route. The decode buffers come from torch's caching allocator: a buffer
shared between layers would be overwritten by another thread's layer, or freed under a captured CUDA graph.

A backward that must itself be differentiable (``create_graph=True``, e.g. a gradient penalty) recomputes the
layer with torch operations on the decoded weight, so second-order terms are exact.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import dispatch, reference
from .kernels.configs import matmul_config
from .kernels.dequantize import dequantize_4bit
from .kernels.dropout import dropout_scale_
from .kernels.lora_gemv import lora_gemv_4bit
from .kernels.lora_lowrank import lora_da, lora_down, lora_dy_pass
from .kernels.lora_matmul import IN_LOOP_RANK_LIMIT, lora_matmul
from .kernels.operands import Dropout, Packed4bit

Weight = Union[Packed4bit, torch.Tensor]


def _gemm_weight(weight: Weight, path: str, dtype: torch.dtype) -> Weight:
    """The weight operand of the GEMM: the packed 4-bit weight (fused path), or it decoded into a fresh buffer."""
    if isinstance(weight, Packed4bit) and path in ("dequant", "dequant_cublas", "gemv"):
        return dequantize_4bit(weight, dtype)
    return weight


SMALL_M = 16  # token counts of the decode regime


def _splits_k(x: torch.Tensor, weight: Weight, path: str) -> bool:
    """Whether the forward GEMM's config splits K (the left factor then cannot be accumulated in its loop)."""
    n_out = weight.n if isinstance(weight, Packed4bit) else weight.shape[0]
    return matmul_config(x.shape[0], n_out, x.shape[1], x.dtype).split_k > 1


def lora_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: Weight,
    scaling: float,
    dropout: Optional[Dropout],
    path: str,
    keep_left: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The forward pass on 2-D x: ``(y, left)``, with ``left = drop(x)·Aᵀ`` (fp32) when ``keep_left`` (dB needs it).

    Called directly where no gradient is needed, which spares the autograd bookkeeping on the host.
    """
    rank = lora_A.shape[0]
    if path == "gemv":  # functional.resolve_path sends only calls the GEMV serves here
        left = lora_down(x, lora_A.t(), dropout) if dropout is not None else torch.mm(x, lora_A.t().to(x.dtype))
        y = lora_gemv_4bit(x, weight, right=lora_B, left=left, scaling=scaling, bias=bias)
        return y, (left.float() if keep_left else None)
    gemm_weight = _gemm_weight(weight, path, x.dtype)
    if path == "dequant_cublas":
        # cuBLAS computes x·Aᵀ faster than the rank-r kernel; the dropout mask needs the kernel
        left = lora_down(x, lora_A.t(), dropout) if dropout is not None else torch.mm(x, lora_A.t().to(x.dtype))
        scaled_left, right = (left * scaling).to(x.dtype), lora_B.t().to(x.dtype)
        y = torch.mm(scaled_left, right) if bias is None else torch.addmm(bias.to(x.dtype), scaled_left, right)
        y.addmm_(x, gemm_weight.t())  # in place: the LoRA term is the GEMM's C operand, no extra copy
        left = left.float() if keep_left else None
    elif dropout is None and rank <= IN_LOOP_RANK_LIMIT and not _splits_k(x, weight, path):
        left = torch.empty((x.shape[0], rank), dtype=torch.float32, device=x.device) if keep_left else None
        y = lora_matmul(
            x, gemm_weight, weight_out_by_in=True, right=lora_B, down=lora_A.t(), left_out=left,
            scaling=scaling, bias=bias,
        )  # fmt: skip
    else:
        # Few rows: cuBLAS's x·Aᵀ beats the rank-r kernel, which has only M / BLOCK_M programs
        small = dropout is None and x.shape[0] <= SMALL_M
        left = torch.mm(x, lora_A.t().to(x.dtype)).float() if small else lora_down(x, lora_A.t(), dropout)
        y = lora_matmul(x, gemm_weight, weight_out_by_in=True, right=lora_B, left=left, scaling=scaling, bias=bias)
    return y, left


class LoRALinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias`` on 2-D x, through the Triton kernels."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        bias: Optional[torch.Tensor],
        weight: Weight,
        scaling: float,
        dropout: Optional[Dropout],
        path: str,
    ) -> torch.Tensor:
        y, left = lora_forward(x, lora_A, lora_B, bias, weight, scaling, dropout, path, ctx.needs_input_grad[2])
        ctx.save_for_backward(x, lora_A, lora_B, left)
        ctx.weight, ctx.scaling, ctx.dropout, ctx.path = weight, scaling, dropout, path
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: these gradients will be differentiated again
            return _differentiable_backward(ctx, dy)
        with dispatch.device_guard(dy.device):
            return lora_backward(ctx, dy)


def lora_backward(ctx, dy: torch.Tensor) -> tuple:
    """The kernels' gradients ``(dx, dA, dB, dbias, None, ...)`` from a context holding what the forward saved.

    ``ctx`` carries ``saved_tensors`` (x, A, B, left), ``needs_input_grad``, ``weight``, ``scaling``,
    ``dropout``, ``path`` and ``bias_dtype``: the autograd context, or the custom op's stand-in.
    """
    x, lora_A, lora_B, left = ctx.saved_tensors
    need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
    scaling, dropout = ctx.scaling, ctx.dropout
    dx = d_lora_A = d_lora_B = d_bias = None
    if need_B:
        dyb, d_lora_B = lora_dy_pass(dy, lora_B, left, scaling)
        d_lora_B = d_lora_B.to(lora_B.dtype)
    elif need_x or need_A:
        dyb = lora_down(dy, lora_B)
    if need_x:
        gemm_weight = _gemm_weight(ctx.weight, ctx.path, dy.dtype)
        if ctx.path == "dequant_cublas":
            dx = torch.mm((dyb * scaling).to(dy.dtype), lora_A.to(dy.dtype))
            if dropout is not None:
                dropout_scale_(dx, dropout)
            dx.addmm_(dy, gemm_weight)
        else:
            dx = lora_matmul(
                dy, gemm_weight, weight_out_by_in=False, right=lora_A.t(), left=dyb, scaling=scaling,
                dropout=dropout,
            )  # fmt: skip
    if need_A:
        d_lora_A = lora_da(dyb, x, scaling, dropout).to(lora_A.dtype)
    if need_bias:
        d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, d_lora_A, d_lora_B, d_bias, None, None, None, None


def _differentiable_backward(ctx, dy: torch.Tensor) -> tuple:
    """The gradients as torch operations on the decoded weight, recorded by autograd (for double backward)."""
    dispatch.report_once(
        "double-backward",
        "lora_engine: a backward with create_graph=True runs the layer's gradients as torch operations (second-"
        "order terms included), not through the kernels",
    )
    x, lora_A, lora_B, _ = ctx.saved_tensors
    weight, dropout = ctx.weight, ctx.dropout
    with dispatch.device_guard(dy.device):
        dense = dequantize_4bit(weight, torch.float32) if isinstance(weight, Packed4bit) else weight.float()
    x_lora = x.float()
    if dropout is not None:
        keep = reference.dropout_keep_mask(dropout.seed, x.shape[0], x.shape[1], dropout.p, x.device)
        x_lora = x_lora * (keep.float() * dropout.inv_keep_prob)
    # the bias adds a constant: the gradients of x, A and B do not depend on it
    y = x.float() @ dense.t() + ctx.scaling * ((x_lora @ lora_A.float().t()) @ lora_B.float().t())
    wanted = [t for t, need in zip((x, lora_A, lora_B), ctx.needs_input_grad[:3]) if need]
    grads = iter(torch.autograd.grad(y, wanted, dy.float(), create_graph=True) if wanted else ())
    dx, d_lora_A, d_lora_B = (next(grads).to(t.dtype) if need else None
                              for t, need in zip((x, lora_A, lora_B), ctx.needs_input_grad[:3]))  # fmt: skip
    d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return dx, d_lora_A, d_lora_B, d_bias, None, None, None, None


# A frozen 4-bit layer without an adapter: y = x·deq(W)ᵀ + bias, dx = dy·deq(W), dbias = Σ dy. The same kernels
# with their LoRA operands left out (the LORA constexpr off); W is decoded again in the backward, never kept.


def linear_forward(x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, path: str) -> torch.Tensor:
    """``x·Wᵀ + bias`` on 2-D x through ``path`` (any of ``dispatch.PATHS``)."""
    if path == "gemv":  # functional._resolve_path sends only calls the GEMV serves here
        return lora_gemv_4bit(x, weight, bias=bias)
    gemm_weight = _gemm_weight(weight, path, x.dtype)
    if path == "dequant_cublas":
        return torch.mm(x, gemm_weight.t()) if bias is None else torch.addmm(bias.to(x.dtype), x, gemm_weight.t())
    return lora_matmul(x, gemm_weight, weight_out_by_in=True, bias=bias)


def linear_backward_input(dy: torch.Tensor, weight: Weight, path: str) -> torch.Tensor:
    """``dx = dy·W`` (the gemv path's backward takes the dequant route, as the LoRA layer's does)."""
    gemm_weight = _gemm_weight(weight, path, dy.dtype)
    if path == "dequant_cublas":
        return torch.mm(dy, gemm_weight)
    return lora_matmul(dy, gemm_weight, weight_out_by_in=False)


class Linear4bitFunction(torch.autograd.Function):
    """``y = x·Wᵀ + bias`` on 2-D x with W frozen, through the Triton kernels; saves nothing but W's reference."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, path: str) -> torch.Tensor:
        ctx.weight, ctx.path = weight, path
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return linear_forward(x, bias, weight, path)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        need_x, need_bias = ctx.needs_input_grad[:2]
        dx = d_bias = None
        if need_x:
            if torch.is_grad_enabled():  # create_graph=True: dx = dy·W must itself be differentiable in dy
                dispatch.report_once(
                    "double-backward-base",
                    "lora_engine: a backward with create_graph=True runs the 4-bit base layer's input gradient as "
                    "a torch operation on the decoded weight, not through the kernels",
                )
                with dispatch.device_guard(dy.device):
                    weight = ctx.weight
                    dense = dequantize_4bit(weight, dy.dtype) if isinstance(weight, Packed4bit) else weight
                dx = dy @ dense.to(dy.dtype)
            else:
                with dispatch.device_guard(dy.device):
                    dx = linear_backward_input(dy, ctx.weight, ctx.path)
        if need_bias:
            d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, d_bias, None, None

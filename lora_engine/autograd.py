"""The autograd function over the Triton kernels: forward and the three gradients of the LoRA layer.

    forward  y  = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias          saves x, A, B and left = drop(x)·Aᵀ (M x r)
    backward dyB = dy·B,  dB = s·dyᵀ·left                   one pass over dy
             dx = dy·W + s·keep ⊙ (dyB·A)                   GEMM with the LoRA term in its epilogue
             dA = s·dyBᵀ·drop(x)                            one pass over x, dropout mask redrawn
W is frozen (4-bit ``Packed4bit`` or a dense tensor) and gets no gradient.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import dispatch
from .kernels.dequantize import dequantize_4bit
from .kernels.lora_lowrank import lora_da, lora_down, lora_dy_pass
from .kernels.lora_matmul import IN_LOOP_RANK_LIMIT, lora_matmul
from .kernels.operands import Dropout, Packed4bit

Weight = Union[Packed4bit, torch.Tensor]


def _gemm_weight(weight: Weight, path: str, dtype: torch.dtype) -> Weight:
    """The weight operand of the GEMM: the packed 4-bit weight (fused path) or it decoded into the workspace."""
    if isinstance(weight, Packed4bit) and path == "dequant":
        buffer = dispatch.dequant_workspace(weight.data.device, dtype, weight.n * weight.k)
        return dequantize_4bit(weight, dtype, out=buffer)
    return weight


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
        rank = lora_A.shape[0]
        gemm_weight = _gemm_weight(weight, path, x.dtype)
        keep_left = ctx.needs_input_grad[2]  # dB needs drop(x)·Aᵀ
        if dropout is None and rank <= IN_LOOP_RANK_LIMIT:
            left = torch.empty((x.shape[0], rank), dtype=torch.float32, device=x.device) if keep_left else None
            y = lora_matmul(
                x, gemm_weight, weight_out_by_in=True, right=lora_B, down=lora_A.t(), left_out=left,
                scaling=scaling, bias=bias,
            )  # fmt: skip
        else:
            left = lora_down(x, lora_A.t(), dropout)
            y = lora_matmul(x, gemm_weight, weight_out_by_in=True, right=lora_B, left=left, scaling=scaling, bias=bias)
        ctx.save_for_backward(x, lora_A, lora_B, left)
        ctx.weight, ctx.scaling, ctx.dropout, ctx.path = weight, scaling, dropout, path
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
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
            dx = lora_matmul(
                dy, gemm_weight, weight_out_by_in=False, right=lora_A.t(), left=dyb, scaling=scaling, dropout=dropout
            )
        if need_A:
            d_lora_A = lora_da(dyb, x, scaling, dropout).to(lora_A.dtype)
        if need_bias:
            d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, d_lora_A, d_lora_B, d_bias, None, None, None, None

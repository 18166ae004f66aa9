"""The autograd function over the Triton kernels: one forward and one backward per adapter kind.

LoRA (``kinds.Lora``):

    forward  y  = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias          saves x, A, B and left = drop(x)·Aᵀ (M x r)
    backward dyB = dy·B,  dB = s·dyᵀ·left                   one pass over dy
             dx = dy·W + s·keep ⊙ (dyB·A)                   GEMM with the LoRA term in its epilogue
             dA = s·dyBᵀ·drop(x)                            one pass over x, dropout mask redrawn
IA3 (``kinds.IA3``, scale l):
    input scaled   y = (x ⊙ l)·Wᵀ + bias        prologue flag of the GEMM / GEMV
                   g = dy·W,  dx = g ⊙ l,  dl = Σ_rows x ⊙ g
    output scaled  y = (x·Wᵀ + bias) ⊙ l        epilogue flag
                   dx = (dy ⊙ l)·W (prologue flag),  dl = Σ_rows dy ⊙ (x·Wᵀ + bias),  dbias = Σ_rows dy ⊙ l
                   the base product is recomputed in the backward rather than saved (one GEMM for M x N memory)
DoRA (``kinds.Dora``, g = m / ‖W + s·B·A‖ per output row, the norm a constant as in PEFT):
    no dropout     y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias      one GEMM, the LoRA term and g in its epilogue
                   LoRA's backward on g ⊙ dy;  dm = Σ_rows dy ⊙ z / ‖·‖ with z = x·Wᵀ + s·left·Bᵀ recomputed
    dropout        y = x·Wᵀ + bias + (g − 1) ⊙ (xd·Wᵀ) + g ⊙ s·(xd·Aᵀ)·Bᵀ,  xd = drop(x)    (PEFT's rule)
                   one GEMM over the stacked rows [x; xd], saves left = xd·Aᵀ (M x r), the mask redrawn
                   dx = dy·W + drop'(((g − 1) ⊙ dy)·W + s·(dy·(g ⊙ B))·A)   one GEMM over [dy; (g − 1) ⊙ dy]
                   (see ``_dora_dropout_forward`` / ``_dora_dropout_backward``)
LowRank (``kinds.LowRank``, left given: LoRA factors only their own modules produce, e.g. sharded by FSDP):
    forward  y = x·Wᵀ + s·left·Bᵀ + bias                   the GEMM with the left factor read, as LoRA's
    backward dleft = s·dy·B,  dB = s·dyᵀ·left,  dx = dy·W   dleft reaches x and A through left's own graph
W is frozen (4-bit ``Packed4bit`` or a dense tensor) and gets no gradient. ``KINDS`` maps each bundle type to its
forward and backward; ``AdapterLinearFunction`` and the custom ops (``custom_ops.py``) both call them. A mixed batch
(``kinds.MultiLora``, every row with its own LoRA adapter) has its own pair, ``multi_lora_forward`` and
``multi_lora_backward`` (the math at ``MultiLoraFunction``), which ``MultiLoraFunction`` and the mixed-batch custom
ops both call.

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

from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from . import dispatch
from .dispatch import as_dtype
from .kernels.configs import matmul_config, multi_lora_config
from .kernels.dequantize import dequantize_4bit
from .kernels.dropout import dropout_scale_
from .kernels.lora_gemv import lora_gemv_4bit
from .kernels.lora_lowrank import lora_da, lora_down, lora_dy_pass
from .kernels.lora_matmul import IN_LOOP_RANK_LIMIT, lora_matmul
from .kernels.lora_multi import Segments, multi_lora_expand, multi_lora_shrink, segment_metadata
from .kernels.operands import Dropout, Packed4bit
from .kinds import IA3, Adapter, Dora, Lora, LowRank, MultiLora

Weight = Union[Packed4bit, torch.Tensor]


def _gemm_weight(weight: Weight, path: str, dtype: torch.dtype) -> Weight:
    """The weight operand of the GEMM: the packed 4-bit weight (fused path), or it decoded into a fresh buffer."""
    if isinstance(weight, Packed4bit) and path in ("dequant", "dequant_cublas", "gemv"):
        return dequantize_4bit(weight, dtype)
    return weight


SMALL_M = 16  # token counts of the decode regime


def _left(x: torch.Tensor, lora_A: torch.Tensor, dropout: Optional[Dropout] = None) -> torch.Tensor:
    """``drop(x)·Aᵀ`` in fp32 [M, r]. Few rows without dropout: cuBLAS, which beats the rank-r kernel there (it has
    only M / BLOCK_M programs); otherwise the rank-r kernel, which also draws the dropout mask."""
    if dropout is None and x.shape[0] <= SMALL_M:
        return torch.mm(x, as_dtype(lora_A, x.dtype).t()).float()
    return lora_down(x, lora_A.t(), dropout)


def _left_mm(x: torch.Tensor, lora_A: torch.Tensor, dropout: Optional[Dropout]) -> torch.Tensor:
    """``drop(x)·Aᵀ`` for the paths that take it in x's dtype (gemv, dequant_cublas): cuBLAS, or the rank-r kernel
    (fp32) when a dropout mask must be drawn."""
    return lora_down(x, lora_A.t(), dropout) if dropout is not None else torch.mm(x, as_dtype(lora_A, x.dtype).t())


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
    if path in ("gemv", "dequant_cublas"):
        # cuBLAS computes x·Aᵀ faster than the rank-r kernel; the dropout mask needs the kernel
        left = _left_mm(x, lora_A, dropout)
        y = forward_with_left(x, left, lora_B, bias, weight, scaling, path)
        return y, (left.float() if keep_left else None)
    if dropout is None and rank <= IN_LOOP_RANK_LIMIT and not _splits_k(x, weight, path):
        left = torch.empty((x.shape[0], rank), dtype=torch.float32, device=x.device) if keep_left else None
        y = lora_matmul(
            x, _gemm_weight(weight, path, x.dtype), weight_out_by_in=True, right=lora_B, down=lora_A.t(),
            left_out=left, scaling=scaling, bias=bias,
        )  # fmt: skip
        return y, left
    left = _left(x, lora_A, dropout)
    return forward_with_left(x, left, lora_B, bias, weight, scaling, path), left


def forward_with_left(
    x: torch.Tensor,
    left: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: Weight,
    scaling: float,
    path: str,
) -> torch.Tensor:
    """``x·Wᵀ + s·left·Bᵀ + bias`` on 2-D x with the left factor given ([M, r], any float dtype)."""
    if path == "gemv":  # functional.resolve_path sends only calls the GEMV serves here
        return lora_gemv_4bit(x, weight, right=lora_B, left=left, scaling=scaling, bias=bias)
    gemm_weight = _gemm_weight(weight, path, x.dtype)
    if path == "dequant_cublas":
        scaled_left, right = as_dtype(left * scaling, x.dtype), as_dtype(lora_B, x.dtype).t()
        y = torch.mm(scaled_left, right) if bias is None else torch.addmm(bias.to(x.dtype), scaled_left, right)
        return y.addmm_(x, gemm_weight.t())  # in place: the LoRA term is the GEMM's C operand, no extra copy
    return lora_matmul(x, gemm_weight, weight_out_by_in=True, right=lora_B, left=left, scaling=scaling, bias=bias)


def _dy_pass(
    dy: torch.Tensor, lora_B: torch.Tensor, left: Optional[torch.Tensor], scaling: float, need_B: bool,
    need_dyb: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dy·B, s·dyᵀ·left)`` in fp32, each None unless wanted: one pass over dy for both where dB is wanted."""
    if need_B:
        return lora_dy_pass(dy, lora_B, left, scaling)
    return (lora_down(dy, lora_B) if need_dyb else None), None


def lora_backward(
    adapter: Lora, dy: torch.Tensor, x: torch.Tensor, left: Optional[torch.Tensor], weight: Weight, path: str,
    needs: tuple[bool, bool, bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dx, dA, dB)`` through the kernels, each None unless ``needs`` (x, A, B) asks for it.

    ``left`` is the forward's fp32 ``drop(x)·Aᵀ`` (needed for dB only).
    """
    lora_A, lora_B, scaling, dropout = adapter
    need_x, need_A, need_B = needs
    dx = d_lora_A = None
    dyb, d_lora_B = _dy_pass(dy, lora_B, left, scaling, need_B, need_x or need_A)
    if need_B:
        d_lora_B = as_dtype(d_lora_B, lora_B.dtype)
    if need_x:
        gemm_weight = _gemm_weight(weight, path, dy.dtype)
        if path == "dequant_cublas":
            dx = torch.mm(as_dtype(dyb * scaling, dy.dtype), as_dtype(lora_A, dy.dtype))
            if dropout is not None:
                dropout_scale_(dx, dropout)
            dx.addmm_(dy, gemm_weight)
        else:
            dx = lora_matmul(
                dy, gemm_weight, weight_out_by_in=False, right=lora_A.t(), left=dyb, scaling=scaling,
                dropout=dropout,
            )  # fmt: skip
    if need_A:
        d_lora_A = as_dtype(lora_da(dyb, x, scaling, dropout), lora_A.dtype)
    return dx, d_lora_A, d_lora_B


def _lora_kind_forward(
    adapter: Lora, x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, path: str, needs: tuple[bool, ...]
) -> tuple[torch.Tensor, tuple[Optional[torch.Tensor], ...]]:
    lora_A, lora_B, scaling, dropout = adapter
    y, left = lora_forward(x, lora_A, lora_B, bias, weight, scaling, dropout, path, keep_left=needs[1])
    return y, (left,)


def _lora_kind_backward(
    adapter: Lora, dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], saved: tuple, weight: Weight,
    path: str, need_x: bool, needs: tuple[bool, ...], need_bias: bool,
) -> tuple[Optional[torch.Tensor], tuple[Optional[torch.Tensor], ...], Optional[torch.Tensor]]:
    dx, d_lora_A, d_lora_B = lora_backward(adapter, dy, x, saved[0], weight, path, (need_x, *needs))
    d_bias = dy.sum(0, dtype=torch.float32) if need_bias else None
    return dx, (d_lora_A, d_lora_B), d_bias


def _lowrank_kind_forward(
    adapter: LowRank, x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, path: str, needs: tuple[bool, ...]
) -> tuple[torch.Tensor, tuple[Optional[torch.Tensor], ...]]:
    left, lora_B, scaling = adapter
    return forward_with_left(x, left, lora_B, bias, weight, scaling, path), ()


def _lowrank_kind_backward(
    adapter: LowRank, dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], saved: tuple, weight: Weight,
    path: str, need_x: bool, needs: tuple[bool, ...], need_bias: bool,
) -> tuple[Optional[torch.Tensor], tuple[Optional[torch.Tensor], ...], Optional[torch.Tensor]]:
    left, lora_B, scaling = adapter
    need_left, need_B = needs
    dyb, d_lora_B = _dy_pass(dy, lora_B, left, scaling, need_B, need_left)
    d_left = dyb.mul_(scaling) if need_left else None
    dx = linear_backward_input(dy, weight, path) if need_x else None
    d_bias = dy.sum(0, dtype=torch.float32) if need_bias else None
    return dx, (d_left, d_lora_B), d_bias


def ia3_forward(adapter: IA3, x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, path: str) -> torch.Tensor:
    """``(x ⊙ l)·Wᵀ + bias`` or ``(x·Wᵀ + bias) ⊙ l`` on 2-D x, the scale fused into the product."""
    scale = adapter.scale
    in_scale, out_scale = (scale, None) if adapter.scales_input else (None, scale)
    if path == "gemv":  # functional.resolve_path sends only calls the GEMV serves here
        return lora_gemv_4bit(x, weight, bias=bias, in_scale=in_scale, out_scale=out_scale)
    gemm_weight = _gemm_weight(weight, path, x.dtype)
    if path == "dequant_cublas":
        a = (x.float() * scale.float()).to(x.dtype) if adapter.scales_input else x
        y = torch.mm(a, gemm_weight.t()) if bias is None else torch.addmm(bias.to(x.dtype), a, gemm_weight.t())
        return y if adapter.scales_input else (y.float() * scale.float()).to(x.dtype)
    return lora_matmul(x, gemm_weight, weight_out_by_in=True, bias=bias, in_scale=in_scale, out_scale=out_scale)


def _ia3_kind_forward(
    adapter: IA3, x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, path: str, needs: tuple[bool, ...]
) -> tuple[torch.Tensor, tuple[Optional[torch.Tensor], ...]]:
    return ia3_forward(adapter, x, bias, weight, path), ()


def _ia3_kind_backward(
    adapter: IA3, dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], saved: tuple, weight: Weight,
    path: str, need_x: bool, needs: tuple[bool, ...], need_bias: bool,
) -> tuple[Optional[torch.Tensor], tuple[Optional[torch.Tensor], ...], Optional[torch.Tensor]]:
    scale = adapter.scale
    (need_scale,) = needs
    dx = d_scale = d_bias = None
    # the backward GEMMs run on the decoded weight on every 4-bit path but "fused" (as LoRA's backward does)
    bwd_path = "dequant" if path in ("gemv", "dequant_cublas") else path
    if adapter.scales_input:
        if need_x or need_scale:
            g = lora_matmul(dy, _gemm_weight(weight, bwd_path, dy.dtype), weight_out_by_in=False)  # dy·W
            if need_x:
                dx = (g.float() * scale.float()).to(dy.dtype)
            if need_scale:
                d_scale = (x.float() * g.float()).sum(0)
        if need_bias:
            d_bias = dy.sum(0, dtype=torch.float32)
        return dx, (d_scale,), d_bias
    if need_x or need_scale:
        gemm_weight = _gemm_weight(weight, bwd_path, dy.dtype)
        if need_x:
            dx = lora_matmul(dy, gemm_weight, weight_out_by_in=False, in_scale=scale)
        if need_scale:  # the base output, recomputed: saving it would hold an M x N activation per layer
            base = lora_matmul(x, gemm_weight, weight_out_by_in=True, bias=bias)
            d_scale = (dy.float() * base.float()).sum(0)
    if need_bias:
        d_bias = (dy.float() * scale.float()).sum(0)
    return dx, (d_scale,), d_bias


def dora_weight_norm(adapter: Dora, weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """‖W + s·B·A‖ per output row (fp32, no gradient) without a dense copy of W + s·B·A:

        ‖W + sBA‖²ₙ = ‖W‖²ₙ + 2s·Σᵣ B[n,r]·(W·Aᵀ)[n,r] + s²·B[n]·(A·Aᵀ)·B[n]ᵀ

    with ‖W‖² cached per weight and W·Aᵀ one GEMM over W with A as an r-row input (products in ``dtype``).
    """
    lora_A, lora_B = adapter.lora_A.detach(), adapter.lora_B.detach()
    w_at = lora_matmul(lora_A.to(dtype), weight, weight_out_by_in=True).float()  # (A·Wᵀ) = (W·Aᵀ)ᵀ, [r, N]
    b32, a32, s = lora_B.float(), lora_A.float(), adapter.scaling
    cross = (b32 * w_at.t()).sum(1)
    quad = ((b32 @ (a32 @ a32.t())) * b32).sum(1)
    return (adapter.base_norm_sq + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()


def _dora_kind_forward(
    adapter: Dora, x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, path: str, needs: tuple[bool, ...]
) -> tuple[torch.Tensor, tuple[Optional[torch.Tensor], ...]]:
    # One Triton GEMM with the LoRA term and the row scale in its epilogue; "gemv" and "dequant_cublas" take the
    # "dequant" route (their kernels have no such epilogue).
    gemm_weight = _gemm_weight(weight, "dequant" if path in ("gemv", "dequant_cublas") else path, x.dtype)
    norm = dora_weight_norm(adapter, gemm_weight, x.dtype)
    scale = (adapter.magnitude.detach().float() / norm).contiguous()
    if adapter.dropout is not None:
        y, left = _dora_dropout_forward(adapter, x, bias, gemm_weight, scale)
        return y, (left, scale, norm)
    lora_A, lora_B = adapter.lora_A, adapter.lora_B
    left = _left(x, lora_A)
    y = lora_matmul(
        x, gemm_weight, weight_out_by_in=True, right=lora_B, left=left, scaling=adapter.scaling, bias=bias,
        out_scale=scale, scale_bias=False,
    )  # fmt: skip
    return y, (left, scale, norm)


def _dora_kind_backward(
    adapter: Dora, dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], saved: tuple, weight: Weight,
    path: str, need_x: bool, needs: tuple[bool, ...], need_bias: bool,
) -> tuple[Optional[torch.Tensor], tuple[Optional[torch.Tensor], ...], Optional[torch.Tensor]]:
    left, scale, norm = saved
    need_A, need_B, need_m = needs
    bwd_path = "dequant" if path in ("gemv", "dequant_cublas") else path
    if adapter.dropout is not None:
        return _dora_dropout_backward(adapter, dy, x, saved, weight, bwd_path, need_x, needs, need_bias)
    # the norm is a constant (PEFT detaches it): y = g ⊙ z + bias, so dz = g ⊙ dy and LoRA's backward takes dz
    dz = (dy.float() * scale).to(dy.dtype)
    lora = Lora(adapter.lora_A, adapter.lora_B, adapter.scaling, None)
    dx, d_lora_A, d_lora_B = lora_backward(lora, dz, x, left, weight, bwd_path, (need_x, need_A, need_B))
    d_m = None
    if need_m:  # dm = Σ_rows dy ⊙ z / ‖·‖, with z = x·Wᵀ + s·left·Bᵀ recomputed (one GEMM, no M x N saved)
        z = lora_matmul(
            x, _gemm_weight(weight, bwd_path, x.dtype), weight_out_by_in=True, right=adapter.lora_B, left=left,
            scaling=adapter.scaling,
        )  # fmt: skip
        d_m = (dy.float() * z.float()).sum(0) / norm
    d_bias = dy.sum(0, dtype=torch.float32) if need_bias else None
    return dx, (d_lora_A, d_lora_B, d_m), d_bias


# DoRA with dropout (PEFT's rule in training): y = x·Wᵀ + bias + (g − 1) ⊙ (xd·Wᵀ) + g ⊙ s·(xd·Aᵀ)·Bᵀ, xd = drop(x).
# The two base products share one GEMM over the stacked rows [x; xd] (one launch; at few tokens both halves sit in
# the same row tiles, so W is read or decoded once instead of twice), and so do the backward's two products with W,
# over [dy; (g − 1) ⊙ dy]. The row scale g of the LoRA term is folded into B (g ⊙ (left·Bᵀ) = left·(g ⊙ B)ᵀ, an
# N x r product) so that no M x N tensor is scaled for it. The dropout mask is drawn from the seed, in the
# forward and again in the backward, like LoRA's: beyond x (which every kind saves) only left = xd·Aᵀ (fp32 M x r),
# g and the norm are saved, no mask, no xd, nothing M x N (PEFT keeps xd, its mask, two M x N products and the
# dequantized W). The stacked operands are transient: 2M x K and 2M x N in the forward; in the backward 2M x N,
# 2M x K, and an M x K xd with its M x N product for dm, which is recomputed (as without dropout) rather than saved.


def _dora_dropout_forward(
    adapter: Dora, x: torch.Tensor, bias: Optional[torch.Tensor], gemm_weight: Weight, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, left)`` of DoRA with dropout on 2-D x, ``left = xd·Aᵀ`` (fp32) and ``scale`` = g (fp32 [N]).

    One GEMM over [x; xd] gives ``x·Wᵀ + s·xd·Aᵀ·(g ⊙ B)ᵀ`` on the top rows (the LoRA term in its epilogue) and
    ``xd·Wᵀ`` below; the output then combines them with (g − 1) and the bias in fp32, rounded once.
    """
    m, k = x.shape
    stacked = torch.empty((2 * m, k), dtype=x.dtype, device=x.device)
    stacked[:m].copy_(x)
    x_drop = dropout_scale_(stacked[m:].copy_(x), adapter.dropout)  # the mask lora_da redraws in the backward
    lora_A = adapter.lora_A.detach()
    left = _left(x_drop, lora_A)  # the mask is applied already
    top_left = torch.zeros((2 * m, left.shape[1]), dtype=torch.float32, device=x.device)
    top_left[:m] = left  # the LoRA term on the top rows only
    scaled_B = adapter.lora_B.detach().float() * scale[:, None]
    both = lora_matmul(
        stacked, gemm_weight, weight_out_by_in=True, right=scaled_B, left=top_left, scaling=adapter.scaling
    )
    # fp32 by promotion, and a tensor of its own: a view of both (x fp32) would keep the 2M x N buffer alive
    y = (both[m:] * (scale - 1)).add_(both[:m])
    if bias is not None:
        y += bias
    return y.to(x.dtype), left


def _dora_dropout_backward(
    adapter: Dora, dy: torch.Tensor, x: torch.Tensor, saved: tuple, weight: Weight, path: str, need_x: bool,
    needs: tuple[bool, ...], need_bias: bool,
) -> tuple[Optional[torch.Tensor], tuple[Optional[torch.Tensor], ...], Optional[torch.Tensor]]:
    """The gradients of :func:`_dora_dropout_forward` (``path``: the backward's, "fused" or "dequant").

        dyB = dy·(g ⊙ B)                                    = (g ⊙ dy)·B, fp32 M x r
        dx  = dy·W + drop'(((g − 1) ⊙ dy)·W + s·dyB·A)      one GEMM over [dy; (g − 1) ⊙ dy], the LoRA term on
                                                            the lower rows; drop' scales them by keep / (1 − p)
        dA  = s·dyBᵀ·xd    dB = g ⊙ (s·dyᵀ·left)            the low-rank kernels, the mask redrawn for dA
        dm  = Σ_rows dy ⊙ (xd·Wᵀ + s·left·Bᵀ) / ‖·‖         recomputed (one GEMM over xd, redrawn), not saved
    """
    left, scale, norm = saved
    need_A, need_B, need_m = needs
    m, n = dy.shape
    dropout, scaling = adapter.dropout, adapter.scaling
    gemm_weight = _gemm_weight(weight, path, dy.dtype) if need_x or need_m else None  # one decode for both
    scaled_B = adapter.lora_B.detach().float() * scale[:, None]
    d_lora_A = d_m = dx = None
    dyb, d_lora_B = _dy_pass(dy, scaled_B, left, scaling, need_B, need_x or need_A)
    if need_B:
        d_lora_B = d_lora_B * scale[:, None]
    if need_m:
        x_drop = dropout_scale_(x.clone(memory_format=torch.contiguous_format), dropout)
        z = lora_matmul(
            x_drop, gemm_weight, weight_out_by_in=True, right=adapter.lora_B, left=left, scaling=scaling
        )
        del x_drop
        d_m = (dy.float() * z.float()).sum(0) / norm
    if need_x:
        stacked = torch.empty((2 * m, n), dtype=dy.dtype, device=dy.device)
        stacked[:m].copy_(dy)
        stacked[m:].copy_(dy).mul_(scale - 1)  # computed in fp32, rounded once to dy's dtype
        lower_left = torch.zeros((2 * m, dyb.shape[1]), dtype=torch.float32, device=dy.device)
        lower_left[m:] = dyb
        both = lora_matmul(
            stacked, gemm_weight, weight_out_by_in=False, right=adapter.lora_A.t(), left=lower_left, scaling=scaling
        )
        dx = both[:m] + dropout_scale_(both[m:], dropout)
    if need_A:
        d_lora_A = lora_da(dyb, x, scaling, dropout)
    d_bias = dy.sum(0, dtype=torch.float32) if need_bias else None
    return dx, (d_lora_A, d_lora_B, d_m), d_bias


class KindOps(NamedTuple):
    """The kernels' forward and backward of one adapter kind.

    forward(adapter, x, bias, weight, path, needs) -> (y, saved): ``needs`` says which trainables want a
        gradient; ``saved`` holds the tensors the backward needs beyond x, bias and the trainables (or None).
    backward(adapter, dy, x, bias, saved, weight, path, need_x, needs, need_bias) -> (dx, trainable grads,
        fp32 dbias); what nobody asked for is None.
    """

    forward: Callable[..., tuple[torch.Tensor, tuple[Optional[torch.Tensor], ...]]]
    backward: Callable[..., tuple[Optional[torch.Tensor], tuple[Optional[torch.Tensor], ...], Optional[torch.Tensor]]]


KINDS: dict[type, KindOps] = {
    Lora: KindOps(_lora_kind_forward, _lora_kind_backward),
    IA3: KindOps(_ia3_kind_forward, _ia3_kind_backward),
    Dora: KindOps(_dora_kind_forward, _dora_kind_backward),
    LowRank: KindOps(_lowrank_kind_forward, _lowrank_kind_backward),
}


def adapter_backward(
    adapter: Adapter, dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], saved: tuple, weight: Weight,
    path: str, need_x: bool, needs: tuple[bool, ...], need_bias: bool,
) -> tuple[Optional[torch.Tensor], tuple[Optional[torch.Tensor], ...], Optional[torch.Tensor]]:
    """The kind's backward with the gradients in their inputs' dtypes."""
    backward = KINDS[type(adapter)].backward
    dx, grads, d_bias = backward(adapter, dy, x, bias, saved, weight, path, need_x, needs, need_bias)
    grads = tuple(as_dtype(g, t.dtype) if g is not None else None for g, t in zip(grads, adapter.trainables()))
    return dx, grads, (as_dtype(d_bias, bias.dtype) if d_bias is not None else None)


class AdapterLinearFunction(torch.autograd.Function):
    """The adapted linear layer on 2-D x, through the Triton kernels of the adapter's kind.

    ``apply(x, bias, weight, path, adapter, *adapter.trainables())``: the trainables travel as inputs of their own
    so autograd tracks them; the forward rebuilds the bundle around them.
    """

    @staticmethod
    def forward(ctx, x, bias, weight, path, adapter, *trainables):
        adapter = adapter.with_trainables(trainables)
        needs = tuple(ctx.needs_input_grad[5:])
        y, saved = KINDS[type(adapter)].forward(adapter, x, bias, weight, path, needs)
        ctx.save_for_backward(x, bias, *trainables, *saved)
        ctx.num_trainables = len(trainables)
        ctx.adapter, ctx.weight, ctx.path = adapter, weight, path
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, bias, *rest = ctx.saved_tensors
        trainables, saved = rest[: ctx.num_trainables], tuple(rest[ctx.num_trainables :])
        adapter = ctx.adapter.with_trainables(trainables)
        need_x, need_bias = ctx.needs_input_grad[:2]
        needs = tuple(ctx.needs_input_grad[5:])
        if torch.is_grad_enabled():  # create_graph=True: these gradients will be differentiated again
            dx, grads, d_bias = _differentiable_backward(adapter, dy, x, bias, ctx.weight, need_x, needs, need_bias)
        else:
            with dispatch.device_guard(dy.device):
                dx, grads, d_bias = adapter_backward(
                    adapter, dy, x, bias, saved, ctx.weight, ctx.path, need_x, needs, need_bias
                )
        return (dx, d_bias, None, None, None, *grads)


def _differentiable_backward(
    adapter: Adapter, dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, need_x: bool,
    needs: tuple[bool, ...], need_bias: bool,
) -> tuple:
    """The gradients as torch operations on the decoded weight, recorded by autograd (for double backward)."""
    dispatch.report_once(
        "double-backward",
        "lora_engine: a backward with create_graph=True runs the layer's gradients as torch operations (second-"
        "order terms included), not through the kernels",
    )
    with dispatch.device_guard(dy.device):
        dense = dequantize_4bit(weight, torch.float32) if isinstance(weight, Packed4bit) else weight.float()
    trainables = adapter.trainables()
    bias32 = bias.float() if bias is not None else None
    y = adapter.dense_forward(x.float(), dense, bias32)
    inputs = (x, bias, *trainables)
    flags = (need_x, need_bias, *needs)
    wanted = [t for t, need in zip(inputs, flags) if need]
    grads = iter(torch.autograd.grad(y, wanted, dy.float(), create_graph=True, allow_unused=True) if wanted else ())
    out = [next(grads) if need else None for need in flags]
    out = [g.to(t.dtype) if g is not None else (torch.zeros_like(t) if need else None)
           for g, t, need in zip(out, inputs, flags)]  # fmt: skip
    return out[0], tuple(out[2:]), out[1]


class MultiLoraOperands(NamedTuple):
    """What the mixed batch's kernels read besides x and dy, built once per call on x's device."""

    stacked_A: torch.Tensor  # [n, r_max, in], x's dtype, zero-padded to the largest rank
    stacked_B: torch.Tensor  # [n, out, r_max]
    scalings: torch.Tensor  # fp32 [n]
    segments: Segments  # the rows grouped by adapter


def multi_lora_operands(adapter: MultiLora, x: torch.Tensor) -> MultiLoraOperands:
    """The stacked factors and the rows grouped by adapter (torch operations on the device, no host sync)."""
    stacked_A, stacked_B, scalings = adapter.stacked(x.dtype)
    segments = segment_metadata(adapter.indices, len(adapter.lora_As), multi_lora_config(x.shape[0]).block_m)
    return MultiLoraOperands(stacked_A, stacked_B, scalings, segments)


def multi_lora_add_(
    adapter: MultiLora, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, MultiLoraOperands]:
    """Add a mixed batch's low-rank terms to the base output ``y`` [M, N] in place (x [M, K]): ``(y, left,
    operands)``, with ``left[p] = x[rows[p]]·A_iᵀ`` (fp32 [M, r_max], rows in sorted order) and the operands a
    backward reads. The rows are grouped by adapter on the device, then the shrink and expand kernels run
    (``kernels/lora_multi.py``)."""
    operands = multi_lora_operands(adapter, x)
    left = multi_lora_shrink(x, operands.stacked_A, operands.segments)
    y = multi_lora_expand(y, left, operands.stacked_B, operands.scalings, operands.segments)
    return y, left, operands


def multi_lora_forward(
    adapter: MultiLora, x: torch.Tensor, bias: Optional[torch.Tensor], weight: Weight, path: str
) -> tuple[torch.Tensor, torch.Tensor, MultiLoraOperands]:
    """A mixed batch on 2-D x: the base product ``x·Wᵀ + bias`` through ``path``, then :func:`multi_lora_add_`."""
    return multi_lora_add_(adapter, x, linear_forward(x, bias, weight, path))


def multi_lora_backward(
    adapter: MultiLora, dy: torch.Tensor, x: torch.Tensor, left: torch.Tensor, operands: MultiLoraOperands,
    bias: Optional[torch.Tensor], weight: Weight, path: str, need_x: bool, need_bias: bool, needs: Sequence[bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], list[Optional[torch.Tensor]]]:
    """``(dx, dbias, [dA_0, ..., dA_{n-1}, dB_0, ..., dB_{n-1}])`` of :func:`multi_lora_forward`, each
    None unless asked for (``needs``: one flag per factor, As then Bs); ``path`` is the forward's."""
    stacked_A, stacked_B, scalings, segments = operands
    n = len(adapter.lora_As)
    factors = adapter.trainables()
    dx = d_bias = None
    dy_b = multi_lora_shrink(dy, stacked_B.transpose(1, 2), segments)  # sorted order, fp32 [M, r_max]
    if need_x:
        base = linear_backward_input(dy, weight, "dequant" if path == "gemv" else path)
        dx = multi_lora_expand(base, dy_b, stacked_A.transpose(1, 2), scalings, segments)
    if need_bias:
        d_bias = dy.sum(0, dtype=torch.float32).to(bias.dtype)
    grads: list[Optional[torch.Tensor]] = [None] * (2 * n)
    if any(needs):
        key = adapter.indices[segments.rows]  # the adapter of each sorted position
        x_sorted, dy_sorted = x[segments.rows].float(), dy[segments.rows].float()
        for i, scaling in enumerate(adapter.scalings):
            rows = (key == i).float()[:, None]  # masks, not slices: no host sync for the segment bounds
            rank = factors[i].shape[0]
            if needs[i]:
                grads[i] = (scaling * ((dy_b * rows).t() @ x_sorted))[:rank].to(factors[i].dtype)
            if needs[n + i]:
                d_lora_B = (scaling * ((dy_sorted * rows).t() @ left))[:, :rank]  # a column slice: made dense
                grads[n + i] = d_lora_B.to(factors[n + i].dtype).contiguous()
    return dx, d_bias, grads


class MultiLoraFunction(torch.autograd.Function):
    """A mixed batch with gradients, on 2-D x: ``apply(x, bias, weight, path, adapter, *lora_As, *lora_Bs)``.

        forward   y[m] = x[m]·Wᵀ + s_i·left[m]·B_iᵀ + bias,  left[m] = x[m]·A_iᵀ     (i = idx[m]; saves left)
        backward  dyB[m] = dy[m]·B_i                      the shrink kernel over dy with the stacked Bᵀ
                  dx = dy·W + s_i·dyB[m]·A_i               the base path, then the expand kernel with the stacked Aᵀ
                  dA_i = s_i·Σ_{m of i} dyB[m]ᵀ·x[m],  dB_i = s_i·Σ_{m of i} dy[m]ᵀ·left[m]
                                                           torch products per adapter over its rows (fp32)

    :func:`multi_lora_forward` and :func:`multi_lora_backward` do the work; the mixed-batch custom ops
    (``custom_ops.py``) call the same two.
    """

    @staticmethod
    def forward(ctx, x, bias, weight, path, adapter, *factors):
        n = len(adapter.lora_As)
        adapter = adapter._replace(lora_As=tuple(factors[:n]), lora_Bs=tuple(factors[n:]))
        y, left, operands = multi_lora_forward(adapter, x, bias, weight, path)
        stacked_A, stacked_B, scalings, segments = operands
        ctx.save_for_backward(x, bias, left, stacked_A, stacked_B, scalings, *factors)
        ctx.adapter, ctx.segments, ctx.weight, ctx.path = adapter, segments, weight, path
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, bias, left, stacked_A, stacked_B, scalings, *factors = ctx.saved_tensors
        n = len(ctx.adapter.lora_As)
        adapter = ctx.adapter._replace(lora_As=tuple(factors[:n]), lora_Bs=tuple(factors[n:]))
        operands = MultiLoraOperands(stacked_A, stacked_B, scalings, ctx.segments)
        need_x, need_bias = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            raise RuntimeError("multi_lora_linear_4bit has no double backward (create_graph=True)")
        with dispatch.device_guard(dy.device):
            dx, d_bias, grads = multi_lora_backward(
                adapter, dy, x, left, operands, bias, ctx.weight, ctx.path, need_x, need_bias, ctx.needs_input_grad[5:]
            )
        return (dx, d_bias, None, None, None, *grads)


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

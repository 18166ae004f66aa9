"""Pure-torch reference: the definition of correctness, and the CPU fallback.

Everything is computed in fp32 from bitsandbytes' raw layout (no bitsandbytes call, no Triton) and rounded
once to the activation dtype. Gradients come from torch autograd. Dropout draws the very same Philox bits as
the Triton kernels, so both drop exactly the same elements for a given seed.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from .format import is_cpu_packed, packed_bytes, unpack_cpu_packed, weight_shape
from .kernels.operands import KEEP_BITS
from .validation import (
    check_dense_weight,
    check_dora_magnitude,
    check_frozen_weight,
    check_ia3_linear_args,
    check_linear_args,
    check_lora_linear_args,
    check_lowrank_linear_args,
    check_multi_lora_args,
    check_norm_weight,
)

_U32 = 0xFFFFFFFF
# Philox-4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), as tl.randint uses.
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of uint32 values held in int64 (split to avoid overflow)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_part = a * b_lo  # < 2**48
    high_part = a * b_hi  # < 2**48
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (low_part + ((high_part & 0xFFFF) << 16)) & _U32
    return hi, lo


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """uint32 draws (as int64) equal to Triton's ``tl.randint(seed, offsets)`` for int64 offsets."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _U32, (offsets >> 32) & _U32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0


def draw_dropout_seed() -> int:
    """A dropout seed from torch's default CPU generator (so ``torch.manual_seed`` makes runs repeatable)."""
    return int(draw_dropout_seed_tensor().item())


def draw_dropout_seed_tensor() -> torch.Tensor:
    """The draw of :func:`draw_dropout_seed` as a one-element int64 tensor, not read back to the host (under
    ``torch.compile`` a read would break the graph)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def dropout_keep_mask(
    seed: Union[int, torch.Tensor], rows: int, cols: int, p: float, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Bool [rows, cols]: element (m, k) survives dropout with probability 1 - p, from (seed, m * cols + k).

    ``seed``: an int, or a one-element int64 tensor (what :func:`dora_linear_4bit` draws under ``torch.compile``).
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(())  # zero-dim: combines with tensors on any device
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device)
    bits = philox_randint(seed, offsets) >> (32 - KEEP_BITS)
    return (bits >= int(round(p * 2**KEEP_BITS))).reshape(rows, cols)


def dropout_keep_scale(
    seed: Union[int, torch.Tensor], rows: int, cols: int, p: float, device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[rows, cols] in ``dtype``: 1 / (1 - p) where :func:`dropout_keep_mask` keeps the element, else 0 (what the
    dropped input is multiplied by, and its gradient too)."""
    return dropout_keep_mask(seed, rows, cols, p, device).to(dtype) * (1.0 / (1.0 - p))


def _decoded_absmax(quant_state: Any) -> torch.Tensor:
    absmax = quant_state.absmax
    if not getattr(quant_state, "nested", False):
        return absmax.to(torch.float32).reshape(-1)
    state2 = quant_state.state2
    blocks = torch.arange(absmax.numel(), device=absmax.device)
    outer = state2.absmax.to(torch.float32)[blocks // state2.blocksize]
    scale = state2.code.to(torch.float32)[absmax.reshape(-1).to(torch.int64)] * outer
    offset = quant_state.offset
    return scale + (offset.to(torch.float32) if isinstance(offset, torch.Tensor) else float(offset))


def dequantize_4bit(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode a bitsandbytes 4-bit weight into a dense [N, K] tensor (product in fp32, one rounding to dtype)."""
    n, k = weight_shape(weight, quant_state)
    code = quant_state.code.to(torch.float32)
    if is_cpu_packed(quant_state):
        codes, absmax = unpack_cpu_packed(weight, quant_state)
        values = code[codes] * absmax.repeat_interleave(quant_state.blocksize, dim=1)
        return values.to(dtype)
    packed = packed_bytes(weight).to(torch.int64)
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[: n * k]
    scale = _decoded_absmax(quant_state)
    flat_block = torch.arange(n * k, device=packed.device) // quant_state.blocksize
    return (code[codes] * scale[flat_block]).reshape(n, k).to(dtype)


def _lowrank_linear(
    x: torch.Tensor,
    dense_weight: torch.Tensor,
    left: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``x·Wᵀ + scaling·left·Bᵀ + bias`` in fp32 (left: [..., r] or [M, r]), returned in x's dtype and shape."""
    n, k = dense_weight.shape
    y = x.reshape(-1, k).to(torch.float32) @ dense_weight.to(torch.float32).t()
    y = y + scaling * (left.reshape(-1, lora_B.shape[1]).to(torch.float32) @ lora_B.to(torch.float32).t())
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _lora_linear(
    x: torch.Tensor,
    dense_weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    dropout_p: float,
    training: bool,
    dropout_seed: Optional[int],
) -> torch.Tensor:
    in_features = x.shape[-1]
    x_lora = x.reshape(-1, in_features).to(torch.float32)
    if training and dropout_p > 0:
        seed = draw_dropout_seed() if dropout_seed is None else dropout_seed
        x_lora = x_lora * dropout_keep_scale(seed, x_lora.shape[0], in_features, dropout_p, x.device)
    return _lowrank_linear(x, dense_weight, x_lora @ lora_A.to(torch.float32).t(), lora_B, scaling, bias)


def lora_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: Any,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: Optional[int] = None,
) -> torch.Tensor:
    """``x·deq(W)ᵀ + scaling·(drop(x)·Aᵀ)·Bᵀ + bias`` in fp32, returned in x's dtype; W frozen."""
    n, k = weight_shape(weight, quant_state)
    check_frozen_weight(weight, "lora_linear_4bit")
    check_lora_linear_args(x, n, k, lora_A, lora_B, scaling, bias, dropout_p, packed_bytes(weight).device, dropout_seed)
    dense = dequantize_4bit(weight, quant_state, torch.float32)
    return _lora_linear(x, dense, lora_A, lora_B, scaling, bias, dropout_p, training, dropout_seed)


def linear_4bit(
    x: torch.Tensor, weight: torch.Tensor, quant_state: Any, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x·deq(W)ᵀ + bias`` in fp32, returned in x's dtype; W frozen (a 4-bit layer without an adapter)."""
    n, k = weight_shape(weight, quant_state)
    check_frozen_weight(weight, "linear_4bit")
    check_linear_args(x, n, k, bias, packed_bytes(weight).device)
    dense = dequantize_4bit(weight, quant_state, torch.float32)
    y = x.reshape(-1, k).to(torch.float32) @ dense.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: Optional[int] = None,
) -> torch.Tensor:
    """``x·Wᵀ + scaling·(drop(x)·Aᵀ)·Bᵀ + bias`` for a dense frozen W, in fp32, returned in x's dtype."""
    n, k = check_dense_weight(weight, "lora_linear")
    check_lora_linear_args(x, n, k, lora_A, lora_B, scaling, bias, dropout_p, weight.device, dropout_seed)
    return _lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training, dropout_seed)


def lowrank_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: Any,
    left: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x·deq(W)ᵀ + scaling·left·Bᵀ + bias`` in fp32, returned in x's dtype; W frozen."""
    n, k = weight_shape(weight, quant_state)
    check_frozen_weight(weight, "lowrank_linear_4bit")
    check_lowrank_linear_args(x, n, k, left, lora_B, scaling, bias, packed_bytes(weight).device)
    return _lowrank_linear(x, dequantize_4bit(weight, quant_state, torch.float32), left, lora_B, scaling, bias)


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    left: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x·Wᵀ + scaling·left·Bᵀ + bias`` for a dense frozen W, in fp32, returned in x's dtype."""
    n, k = check_dense_weight(weight, "lowrank_linear")
    check_lowrank_linear_args(x, n, k, left, lora_B, scaling, bias, weight.device)
    return _lowrank_linear(x, weight, left, lora_B, scaling, bias)


def _ia3_linear(
    x: torch.Tensor, dense_weight: torch.Tensor, ia3_l: torch.Tensor, scales_input: bool, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    in_features = x.shape[-1]
    x32 = x.reshape(-1, in_features).to(torch.float32)
    scale = ia3_l.to(torch.float32)
    if scales_input:
        x32 = x32 * scale
    y = x32 @ dense_weight.to(torch.float32).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    if not scales_input:
        y = y * scale  # the bias too, as PEFT's IA3 layers scale the base layer's whole output
    return y.to(x.dtype).reshape(*x.shape[:-1], dense_weight.shape[0])


def ia3_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: Any,
    ia3_l: torch.Tensor,
    scales_input: bool,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(x ⊙ l)·deq(W)ᵀ + bias`` (``scales_input``) or ``(x·deq(W)ᵀ + bias) ⊙ l`` in fp32, in x's dtype; W frozen."""
    n, k = weight_shape(weight, quant_state)
    check_frozen_weight(weight, "ia3_linear_4bit")
    check_ia3_linear_args(x, n, k, ia3_l, scales_input, bias, packed_bytes(weight).device)
    return _ia3_linear(x, dequantize_4bit(weight, quant_state, torch.float32), ia3_l, scales_input, bias)


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    ia3_l: torch.Tensor,
    scales_input: bool,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(x ⊙ l)·Wᵀ + bias`` or ``(x·Wᵀ + bias) ⊙ l`` for a dense frozen W, in fp32, returned in x's dtype."""
    n, k = check_dense_weight(weight, "ia3_linear")
    check_ia3_linear_args(x, n, k, ia3_l, scales_input, bias, weight.device)
    return _ia3_linear(x, weight, ia3_l, scales_input, bias)


def dora_term(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    keep_scale: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The DoRA layer in fp32 torch operations on 2-D x and a dense [out, in] weight, differentiable in x, A, B, m
    and bias: ``g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias`` with ``g = m / ‖W + s·B·A‖`` (row norms; B·A and the norm
    detached, as PEFT's DoRA). ``norm_weight`` (fp32 [out, in]), where given, stands for W in the norm: the weight
    that W was cast from.

    ``keep_scale`` (fp32 [M, K]: the dropout keep mask times 1 / (1 - p)) gives PEFT's rule with dropout in
    training: ``x·Wᵀ + bias + (g − 1) ⊙ (xd·Wᵀ) + g ⊙ s·(xd·Aᵀ)·Bᵀ`` with ``xd = x ⊙ keep_scale``, the DoRA term
    taken on the dropped input with a second base product, without the bias (peft/tuners/lora/dora.py).
    """
    lora_A, lora_B = lora_A.to(torch.float32), lora_B.to(torch.float32)
    norm_weight = weight if norm_weight is None else norm_weight
    norm = torch.linalg.norm(norm_weight + scaling * (lora_B @ lora_A).detach(), dim=1).detach()
    g = magnitude.to(torch.float32) / norm
    if keep_scale is None:
        y = (x @ weight.t() + scaling * ((x @ lora_A.t()) @ lora_B.t())) * g
    else:
        x_drop = x * keep_scale
        y = x @ weight.t() + (g - 1) * (x_drop @ weight.t()) + g * (scaling * ((x_drop @ lora_A.t()) @ lora_B.t()))
    return y if bias is None else y + bias.to(torch.float32)


def dora_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: Any,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: Optional[int] = None,
) -> torch.Tensor:
    """``g ⊙ (x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ) + bias`` with ``g = m / ‖deq(W) + s·B·A‖`` (row norms, detached, as PEFT's
    DoRA), in fp32, returned in x's dtype; W frozen. With dropout (``training`` and ``dropout_p > 0``), PEFT's rule:
    ``x·deq(W)ᵀ + bias + (g − 1) ⊙ (xd·deq(W)ᵀ) + g ⊙ s·(xd·Aᵀ)·Bᵀ``, xd = drop(x) (see :func:`dora_term`). The
    seed as :func:`lora_linear_4bit`'s; under ``torch.compile`` one left to draw is drawn as a tensor (reading it
    back would break the graph)."""
    n, k = weight_shape(weight, quant_state)
    check_frozen_weight(weight, "dora_linear_4bit")
    check_lora_linear_args(x, n, k, lora_A, lora_B, scaling, bias, dropout_p, packed_bytes(weight).device, dropout_seed)
    check_dora_magnitude(magnitude, n, x)
    dense = dequantize_4bit(weight, quant_state, torch.float32)
    return _dora_linear(x, dense, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training, dropout_seed)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: Optional[int] = None,
    norm_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`dora_linear_4bit` over a frozen dense [out_features, in_features] weight; the row norm of
    ``norm_weight + s·B·A`` where given (the weight ``weight`` was cast from, as ``lora_engine.dora_linear``)."""
    n, k = check_dense_weight(weight, "dora_linear")
    check_lora_linear_args(x, n, k, lora_A, lora_B, scaling, bias, dropout_p, weight.device, dropout_seed)
    check_dora_magnitude(magnitude, n, x)
    dense = weight.detach().to(torch.float32)
    norm_dense = None
    if norm_weight is not None:
        check_norm_weight(norm_weight, weight, "dora_linear")
        norm_dense = norm_weight.detach().to(torch.float32)
    return _dora_linear(
        x, dense, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training, dropout_seed, norm_dense
    )


def _dora_linear(
    x: torch.Tensor,
    dense: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    dropout_p: float,
    training: bool,
    dropout_seed: Optional[int],
    norm_dense: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The DoRA layer on x of any leading shape over the fp32 dense W (checked by the caller), in x's dtype; the row
    norm from ``norm_dense`` (fp32) where given (see :func:`dora_term`)."""
    n, k = dense.shape
    x32 = x.reshape(-1, k).to(torch.float32)
    keep_scale = None
    if training and dropout_p > 0:
        seed: Union[int, torch.Tensor]
        if dropout_seed is not None:
            seed = dropout_seed
        elif torch.compiler.is_compiling():
            seed = draw_dropout_seed_tensor()
        else:
            seed = draw_dropout_seed()
        keep_scale = dropout_keep_scale(seed, x32.shape[0], k, dropout_p, x.device)
    y = dora_term(x32, dense, lora_A, lora_B, magnitude, scaling, bias, keep_scale, norm_dense)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def multi_lora_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: Any,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_indices: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A mixed batch: row m gets ``x[m]·deq(W)ᵀ + s_i·(x[m]·A_iᵀ)·B_iᵀ + bias`` with ``i`` its adapter index (-1: the
    base alone), in fp32, returned in x's dtype; W frozen. Indices as ``lora_engine.multi_lora_linear_4bit``."""
    n, k = weight_shape(weight, quant_state)
    check_frozen_weight(weight, "multi_lora_linear_4bit")
    indices = check_multi_lora_args(
        x, n, k, lora_As, lora_Bs, scalings, adapter_indices, bias, packed_bytes(weight).device
    )
    dense = dequantize_4bit(weight, quant_state, torch.float32)
    x32 = x.reshape(-1, k).to(torch.float32)
    y = x32 @ dense.t()
    for i, (lora_A, lora_B, scaling) in enumerate(zip(lora_As, lora_Bs, scalings)):
        rows = indices == i
        delta = scaling * ((x32 @ lora_A.to(torch.float32).t()) @ lora_B.to(torch.float32).t())
        y = torch.where(rows[:, None], y + delta, y)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)

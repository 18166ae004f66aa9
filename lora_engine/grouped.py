"""Several frozen 4-bit projections of the same input in one pass: q/k/v of an attention block, gate/up of an MLP.

For G members with 4-bit weights W_i [N_i, K], optional LoRA factors A_i (r_i x K), B_i (N_i x r_i), scalings s_i
and optional biases b_i, all reading the same x [M, K]:

    forward  W_cat = [deq(W_1); ...; deq(W_G)]  [ΣN_i, K]       decoded into one buffer of the call
             A_cat = [A_1; ...; A_G]            [r_tot, K]      (members with LoRA only)
             y     = x·W_catᵀ                                   one GEMM
             left  = x·A_catᵀ                   [M, r_tot]      one GEMM through the summed rank
             y[:, block_i] += s_i·left_i·B_iᵀ + b_i
    backward dyB_i = s_i·dy_i·B_i,  dyB = [dyB_1, ..., dyB_G]    [M, r_tot]
             dx    = dy·W_cat + dyB·A_cat                        W decoded again: one GEMM, one rank-r_tot GEMM
             dA_cat = dyBᵀ·x,  dB_i = s_i·dy_iᵀ·left_i,  db_i = Σ_m dy_i

A member with LoRA dropout (p_i > 0) reads its own dropped input, as PEFT's per-layer dropout modules do: its
left_i = drop_i(x)·A_iᵀ is a product of its own instead of a block of the stacked one, its share of dx is
drop_i'(dyB_i·A_i) and dA_i = dyB_iᵀ·drop_i(x). The masks are never stored: each is redrawn from the member's
seed (``kernels/dropout.py``; ``reference.dropout_keep_mask`` on the torch backend), the same mask
:func:`lora_engine.lora_linear_4bit` draws for that seed, and seeds are drawn member by member in the order
the per-layer calls draw them.

The output is [M, ΣN_i]; member i's output is its column block. W gets no gradient. The dense buffer is never
kept between forward and backward (it is as large as the three weights in 16 bits): the backward decodes again.
Buffers come from torch's caching allocator, per call.

On the Triton backend the weights are decoded by ``kernels.dequantize`` into slices of the buffer and the
products run on torch (cuBLAS on a GPU) in x's dtype; where Triton cannot run (backend "torch", CPU without the
interpreter) the decode is the torch reference and the whole computation runs in fp32, as the reference does,
with the output rounded once to x's dtype. Under ``torch.compile`` the functional form runs each member through
:func:`lora_engine.lora_linear_4bit` / :func:`lora_engine.linear_4bit` (their registered custom ops compile).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional, Sequence

import torch

from . import dispatch, reference
from .format import packed_4bit_cached, weight_shape
from .kernels.operands import Dropout
from .validation import check_frozen_weight, check_linear_args, check_lora_linear_args

__all__ = ["GroupMember", "GroupedLoRA4bitFunction", "grouped_lora_linear_4bit"]


class GroupMember(NamedTuple):
    """One projection of a group: a frozen bitsandbytes 4-bit weight, optionally a LoRA adapter and a bias."""

    weight: torch.Tensor  # the packed Params4bit (or its data)
    quant_state: Any  # its bitsandbytes QuantState
    lora_A: Optional[torch.Tensor] = None  # (r, in_features); None for a member without LoRA
    lora_B: Optional[torch.Tensor] = None  # (out_features, r)
    scaling: float = 1.0
    bias: Optional[torch.Tensor] = None  # (out_features,)
    dropout_p: float = 0.0  # LoRA dropout for this call (give 0 outside training)
    dropout_seed: Optional[int] = None  # drawn from torch's CPU generator when None and dropout_p > 0

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None


class _Plan(NamedTuple):
    """What the autograd function needs besides the tensors it differentiates."""

    members: tuple[GroupMember, ...]
    sizes: tuple[int, ...]  # N_i
    ranks: tuple[int, ...]  # r_i (0 without LoRA)
    dropouts: tuple[Optional[Dropout], ...]  # member i's LoRA dropout for this call, None without
    triton: bool  # decode with the Triton kernel (else the torch reference)
    compute: torch.dtype  # dtype of the products


def _decode_cat(plan: _Plan, device: torch.device) -> torch.Tensor:
    """All members' weights decoded into one fresh [ΣN_i, K] buffer (member i in its row block)."""
    k = weight_shape(plan.members[0].weight, plan.members[0].quant_state)[1]
    out = torch.empty((sum(plan.sizes), k), dtype=plan.compute, device=device)
    row = 0
    for member, n in zip(plan.members, plan.sizes):
        block = out[row : row + n]  # a block of whole rows of a contiguous buffer: contiguous itself
        if plan.triton:
            from .kernels.dequantize import dequantize_4bit  # imports Triton, which only this path needs

            with torch._C.DisableTorchFunctionSubclass():  # see functional.lora_linear_4bit
                packed = packed_4bit_cached(member.weight, member.quant_state)
            dequantize_4bit(packed, plan.compute, out=block)
        else:
            block.copy_(reference.dequantize_4bit(member.weight, member.quant_state, plan.compute))
        row += n
    return out


class _Entry(NamedTuple):
    """A member with LoRA, as the products see it."""

    index: int  # the member's position
    cols: slice  # its column block of y
    ranks: slice  # its rank block of left and dyB
    lora_A: torch.Tensor  # in the compute dtype
    lora_B: torch.Tensor
    scaling: float
    dropout: Optional[Dropout]


def _lora_factors(plan: _Plan, tensors: Sequence[Optional[torch.Tensor]], dtype: torch.dtype):
    """(A_cat [r_shared, K] of the members without dropout, or None; their entries, then those with dropout).

    The members without dropout take the first r_shared columns of left and dyB, in member order, so that one
    product with A_cat serves them all; each member with dropout follows with a rank block of its own.
    """
    shared, dropped, col = [], [], 0
    for i, (n, r) in enumerate(zip(plan.sizes, plan.ranks)):
        if r:
            (dropped if plan.dropouts[i] is not None else shared).append((i, slice(col, col + n), r))
        col += n
    entries, rank_at = [], 0
    for i, cols, r in shared + dropped:
        lora_A, lora_B = tensors[3 * i].to(dtype), tensors[3 * i + 1].to(dtype)
        scaling = float(plan.members[i].scaling)
        entries.append(_Entry(i, cols, slice(rank_at, rank_at + r), lora_A, lora_B, scaling, plan.dropouts[i]))
        rank_at += r
    a_parts = [e.lora_A for e in entries[: len(shared)]]
    a_cat = torch.cat(a_parts) if len(a_parts) > 1 else (a_parts[0] if a_parts else None)
    return a_cat, entries


def _keep_scale(plan: _Plan, dropout: Dropout, rows: int, device: torch.device) -> torch.Tensor:
    """The torch backend's [rows, K] keep-scale (0 or 1 / (1 - p)) of ``dropout``, in the compute dtype."""
    return reference.dropout_keep_scale(dropout.seed, rows, dropout.row_length, dropout.p, device, plan.compute)


def _dropped_left(plan: _Plan, x: torch.Tensor, entry: _Entry) -> torch.Tensor:
    """drop_i(x)·A_iᵀ [M, r_i] in the compute dtype, the mask redrawn from the member's seed."""
    if plan.triton:
        from .kernels.lora_lowrank import lora_down

        return lora_down(x, entry.lora_A.t(), entry.dropout).to(plan.compute)
    return torch.mm(x * _keep_scale(plan, entry.dropout, x.shape[0], x.device), entry.lora_A.t())


def _forward(plan: _Plan, x: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]):
    """(y [M, ΣN_i] in the compute dtype, left [M, r_tot] or None)."""
    x = x.to(plan.compute)
    y = torch.mm(x, _decode_cat(plan, x.device).t())  # the buffer is freed when this returns
    a_cat, entries = _lora_factors(plan, tensors, plan.compute)
    # the rank blocks in entry order: the shared product first, then each member with dropout
    parts = [torch.mm(x, a_cat.t())] if a_cat is not None else []
    parts += [_dropped_left(plan, x, entry) for entry in entries if entry.dropout is not None]
    left = torch.cat(parts, dim=1) if len(parts) > 1 else (parts[0] if parts else None)
    for entry in entries:
        y[:, entry.cols].addmm_(left[:, entry.ranks], entry.lora_B.t(), alpha=entry.scaling)
    col = 0
    for i, n in enumerate(plan.sizes):
        bias = tensors[3 * i + 2]
        if bias is not None:
            y[:, col : col + n] += bias.to(plan.compute)
        col += n
    return y, left


def _no_autocast(device: torch.device):
    """The products run in the plan's dtype, chosen by the caller: autocast must not recast them."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _dropped_back(plan: _Plan, t: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """``t`` [M, K] times the keep-scale of ``dropout`` (the mask's backward), in place where it can be."""
    if plan.triton:
        from .kernels.dropout import dropout_scale_

        return dropout_scale_(t, dropout)
    return t * _keep_scale(plan, dropout, t.shape[0], t.device)


def _grad_A(plan: _Plan, dyb: torch.Tensor, x: torch.Tensor, dropout: Optional[Dropout]) -> torch.Tensor:
    """dA_i = dyB_iᵀ·drop_i(x) [r_i, K] (dyB_i carries s_i)."""
    if dropout is None:
        return torch.mm(dyb.t(), x)
    if plan.triton:
        from .kernels.lora_lowrank import lora_da

        return lora_da(dyb, x, 1.0, dropout)
    return torch.mm(dyb.t(), x * _keep_scale(plan, dropout, x.shape[0], x.device))


class GroupedLoRA4bitFunction(torch.autograd.Function):
    """``[x·deq(W_i)ᵀ + s_i·(x·A_iᵀ)·B_iᵀ + b_i]_i`` concatenated over the members, on 2-D x (see the module
    docstring). ``apply(x, plan, A_1, B_1, b_1, ..., A_G, B_G, b_G)``, None for absent tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _Plan, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        with dispatch.device_guard(x.device), _no_autocast(x.device):
            y, left = _forward(plan, x, tensors)
        ctx.plan = plan
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(x, left, *tensors)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "lora_engine: a backward with create_graph=True through grouped projections is not supported; "
                "patch without group_projections=True"
            )
        plan: _Plan = ctx.plan
        x, left, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads: list[Optional[torch.Tensor]] = [None] * len(tensors)
        dx = None
        with dispatch.device_guard(dy.device), _no_autocast(dy.device):
            dy = dy.to(plan.compute)
            a_cat, entries = _lora_factors(plan, tensors, plan.compute)
            dyb = None
            if entries and (needs[0] or any(needs[2 + 3 * e.index] for e in entries)):
                # dyB_i = s_i·dy_i·B_i, side by side: one rank-r_tot operand for dx and for every dA_i
                dyb = torch.cat([torch.mm(dy[:, e.cols], e.lora_B) * e.scaling for e in entries], dim=1)
            if needs[0]:
                dx = torch.mm(dy, _decode_cat(plan, dy.device))
                if a_cat is not None:
                    dx.addmm_(dyb[:, : a_cat.shape[0]], a_cat)
                for e in entries:
                    if e.dropout is not None:
                        dx += _dropped_back(plan, torch.mm(dyb[:, e.ranks], e.lora_A), e.dropout)
                dx = dx.to(ctx.x_dtype)
            xc = x.to(plan.compute)
            for e in entries:
                lora_A, lora_B = tensors[3 * e.index], tensors[3 * e.index + 1]
                if needs[2 + 3 * e.index]:
                    grads[3 * e.index] = _grad_A(plan, dyb[:, e.ranks], xc, e.dropout).to(lora_A.dtype)
                if needs[2 + 3 * e.index + 1]:
                    grads[3 * e.index + 1] = (torch.mm(dy[:, e.cols].t(), left[:, e.ranks]) * e.scaling).to(
                        lora_B.dtype
                    )
            col = 0
            for i, n in enumerate(plan.sizes):
                bias = tensors[3 * i + 2]
                if bias is not None and needs[2 + 3 * i + 2]:
                    grads[3 * i + 2] = dy[:, col : col + n].sum(0, dtype=torch.float32).to(bias.dtype)
                col += n
        return (dx, None, *grads)


def _validate(x: torch.Tensor, members: Sequence[GroupMember]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(N_i, r_i) of each member, after checking every shape, dtype and device against x (errors name the member)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not members:
        raise ValueError("grouped_lora_linear_4bit needs at least one member")
    sizes, ranks = [], []
    for i, member in enumerate(members):
        if not isinstance(member, GroupMember):
            raise TypeError(f"member {i} must be a GroupMember, got {type(member).__name__}")
        if (member.lora_A is None) != (member.lora_B is None):
            raise ValueError(f"member {i}: give both lora_A and lora_B, or neither")
        try:
            n, k = weight_shape(member.weight, member.quant_state)
            check_frozen_weight(member.weight, "grouped_lora_linear_4bit")
            device = member.weight.device
            if member.has_lora:
                check_lora_linear_args(x, n, k, member.lora_A, member.lora_B, member.scaling, member.bias,
                                       member.dropout_p, device, member.dropout_seed)  # fmt: skip
            else:
                if member.dropout_p:
                    raise ValueError(f"dropout_p ({member.dropout_p!r}) is LoRA dropout: this member has no LoRA")
                check_linear_args(x, n, k, member.bias, device)
        except (ValueError, TypeError) as error:
            raise type(error)(f"grouped_lora_linear_4bit, member {i}: {error}") from None
        sizes.append(n)
        ranks.append(member.lora_A.shape[0] if member.has_lora else 0)
    return tuple(sizes), tuple(ranks)


def grouped_lora_linear_4bit(x: torch.Tensor, members: Sequence[GroupMember]) -> list[torch.Tensor]:
    """Each member's ``x·deq(W_i)ᵀ + s_i·(drop_i(x)·A_iᵀ)·B_iᵀ + b_i`` (no LoRA term for a member without one),
    computed with one decode buffer and one GEMM for all members (see the module docstring).

    x: [..., in_features] fp16/bf16/fp32 (every member reads the same in_features). A member's ``dropout_p`` is
    applied as given (pass 0 outside training); its seed is ``dropout_seed``, or drawn from torch's CPU generator
    member by member. Returns one tensor per member, [..., N_i] in x's dtype: views of one [..., ΣN_i] output.
    Gradients: x, each A_i, B_i and a bias that requires one; the 4-bit weights get none.
    """
    sizes, ranks = _validate(x, members)
    tensors: list[Optional[torch.Tensor]] = []
    for member in members:
        tensors += [member.lora_A, member.lora_B, member.bias]
    if torch.compiler.is_compiling():  # per member: the functional API's custom ops are what compiles
        from . import functional as F

        return [
            F.lora_linear_4bit(x, m.weight, m.quant_state, m.lora_A, m.lora_B, m.scaling, bias=m.bias,
                               dropout_p=m.dropout_p, training=True, dropout_seed=m.dropout_seed)
            if m.has_lora else F.linear_4bit(x, m.weight, m.quant_state, m.bias)
            for m in members
        ]  # fmt: skip
    dropouts = tuple(
        Dropout(m.dropout_seed if m.dropout_seed is not None else reference.draw_dropout_seed(), m.dropout_p,
                x.shape[-1]) if m.has_lora and m.dropout_p > 0 else None
        for m in members
    )  # fmt: skip
    triton = dispatch.use_triton(x.device, tuple(t.dtype for t in (x, *tensors) if t is not None))
    plan = _Plan(tuple(members), sizes, ranks, dropouts, triton, x.dtype if triton else torch.float32)
    x2d = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, *tensors)):
        y = GroupedLoRA4bitFunction.apply(x2d, plan, *tensors)
    else:  # inference: the same computation without autograd's bookkeeping
        with dispatch.device_guard(x.device), _no_autocast(x.device):
            y = _forward(plan, x2d, tensors)[0].to(x.dtype)
    y = y.reshape(*x.shape[:-1], sum(sizes))
    return list(y.split(sizes, dim=-1))

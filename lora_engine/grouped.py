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

The output is [M, ΣN_i]; member i's output is its column block. W gets no gradient. The dense buffer is never
kept between forward and backward (it is as large as the three weights in 16 bits): the backward decodes again.
Buffers come from torch's caching allocator, per call. There is no dropout on the LoRA branch here: a caller
groups only layers whose dropout is the identity for the call.

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

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None


class _Plan(NamedTuple):
    """What the autograd function needs besides the tensors it differentiates."""

    members: tuple[GroupMember, ...]
    sizes: tuple[int, ...]  # N_i
    ranks: tuple[int, ...]  # r_i (0 without LoRA)
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


def _lora_factors(plan: _Plan, tensors: Sequence[Optional[torch.Tensor]], dtype: torch.dtype):
    """(A_cat [r_tot, K], [(member index, column block, rank block, B_i, s_i)]) over the members with LoRA."""
    a_parts, entries, col, rank_at = [], [], 0, 0
    for i, (n, r) in enumerate(zip(plan.sizes, plan.ranks)):
        if r:
            a_parts.append(tensors[3 * i].to(dtype))
            entries.append((i, slice(col, col + n), slice(rank_at, rank_at + r), tensors[3 * i + 1].to(dtype),
                            float(plan.members[i].scaling)))  # fmt: skip
            rank_at += r
        col += n
    a_cat = torch.cat(a_parts) if len(a_parts) > 1 else (a_parts[0] if a_parts else None)
    return a_cat, entries


def _forward(plan: _Plan, x: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]):
    """(y [M, ΣN_i] in the compute dtype, left [M, r_tot] or None)."""
    x = x.to(plan.compute)
    y = torch.mm(x, _decode_cat(plan, x.device).t())  # the buffer is freed when this returns
    a_cat, entries = _lora_factors(plan, tensors, plan.compute)
    left = torch.mm(x, a_cat.t()) if a_cat is not None else None
    for _, cols, ranks, lora_B, scaling in entries:
        y[:, cols].addmm_(left[:, ranks], lora_B.t(), alpha=scaling)
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
            if entries and (needs[0] or any(needs[2 + 3 * i] for i, *_ in entries)):
                # dyB_i = s_i·dy_i·B_i, side by side: one rank-r_tot operand for dx and for every dA_i
                dyb = torch.cat([torch.mm(dy[:, cols], lora_B) * scaling for _, cols, _, lora_B, scaling in entries],
                                dim=1)  # fmt: skip
            if needs[0]:
                dx = torch.mm(dy, _decode_cat(plan, dy.device))
                if dyb is not None:
                    dx.addmm_(dyb, a_cat)
                dx = dx.to(ctx.x_dtype)
            xc = x.to(plan.compute)
            for i, cols, ranks, _, scaling in entries:
                lora_A, lora_B = tensors[3 * i], tensors[3 * i + 1]
                if needs[2 + 3 * i]:
                    grads[3 * i] = torch.mm(dyb[:, ranks].t(), xc).to(lora_A.dtype)
                if needs[2 + 3 * i + 1]:
                    grads[3 * i + 1] = (torch.mm(dy[:, cols].t(), left[:, ranks]) * scaling).to(lora_B.dtype)
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
                check_lora_linear_args(x, n, k, member.lora_A, member.lora_B, member.scaling, member.bias, 0.0,
                                       device, None)  # fmt: skip
            else:
                check_linear_args(x, n, k, member.bias, device)
        except (ValueError, TypeError) as error:
            raise type(error)(f"grouped_lora_linear_4bit, member {i}: {error}") from None
        sizes.append(n)
        ranks.append(member.lora_A.shape[0] if member.has_lora else 0)
    return tuple(sizes), tuple(ranks)


def grouped_lora_linear_4bit(x: torch.Tensor, members: Sequence[GroupMember]) -> list[torch.Tensor]:
    """Each member's ``x·deq(W_i)ᵀ + s_i·(x·A_iᵀ)·B_iᵀ + b_i`` (no LoRA term for a member without one), computed
    with one decode buffer and one GEMM for all members (see the module docstring).

    x: [..., in_features] fp16/bf16/fp32 (every member reads the same in_features). Returns one tensor per
    member, [..., N_i] in x's dtype: views of one [..., ΣN_i] output. Gradients: x, each A_i, B_i and a bias
    that requires one; the 4-bit weights get none.
    """
    sizes, ranks = _validate(x, members)
    tensors: list[Optional[torch.Tensor]] = []
    for member in members:
        tensors += [member.lora_A, member.lora_B, member.bias]
    if torch.compiler.is_compiling():  # per member: the functional API's custom ops are what compiles
        from . import functional as F

        return [
            F.lora_linear_4bit(x, m.weight, m.quant_state, m.lora_A, m.lora_B, m.scaling, bias=m.bias)
            if m.has_lora else F.linear_4bit(x, m.weight, m.quant_state, m.bias)
            for m in members
        ]  # fmt: skip
    triton = dispatch.use_triton(x.device, tuple(t.dtype for t in (x, *tensors) if t is not None))
    plan = _Plan(tuple(members), sizes, ranks, triton, x.dtype if triton else torch.float32)
    x2d = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, *tensors)):
        y = GroupedLoRA4bitFunction.apply(x2d, plan, *tensors)
    else:  # inference: the same computation without autograd's bookkeeping
        with dispatch.device_guard(x.device), _no_autocast(x.device):
            y = _forward(plan, x2d, tensors)[0].to(x.dtype)
    y = y.reshape(*x.shape[:-1], sum(sizes))
    return list(y.split(sizes, dim=-1))

"""Functional API: validate, pick the backend and path, run the kernels (or the torch reference)."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Optional, Sequence

import torch

from . import dispatch, reference
from .format import packed_4bit, packed_4bit_cached, packed_bytes, row_norms_sq_cached
from .kernels.operands import Dropout, Packed4bit
from .kinds import IA3, Adapter, Dora, Lora, LowRank, MultiLora
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
    """``y = x·deq(W)ᵀ + scaling·(drop(x)·Aᵀ)·Bᵀ + bias`` with W a frozen bitsandbytes 4-bit weight.

    x: [..., in_features] fp16/bf16/fp32, any strides; weight: the packed ``Params4bit`` (or its data) and
    ``quant_state`` its bitsandbytes QuantState; lora_A: (r, in_features); lora_B: (out_features, r).
    Dropout (on the LoRA branch only) applies when ``training`` and ``dropout_p > 0``; its seed, an int in
    [0, 2**63), is drawn from torch's CPU generator unless ``dropout_seed`` is given. Returns [..., out_features]
    in x's dtype. The kernels launch on x's device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, lora_A, lora_B, bias)):
        return reference.lora_linear_4bit(
            x, weight, quant_state, lora_A, lora_B, scaling, bias, dropout_p, training, dropout_seed=dropout_seed
        )
    packed = _packed_weight(weight, quant_state, "lora_linear_4bit")
    check_lora_linear_args(x, packed.n, packed.k, lora_A, lora_B, scaling, bias, dropout_p, packed.data.device,
                           dropout_seed)  # fmt: skip
    return _apply(x, packed, lora_A, lora_B, scaling, bias, dropout_p, training, dropout_seed)


def linear_4bit(
    x: torch.Tensor, weight: torch.Tensor, quant_state: Any, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``y = x·deq(W)ᵀ + bias`` with W a frozen bitsandbytes 4-bit weight: a 4-bit layer without an adapter.

    x: [..., in_features] fp16/bf16/fp32, any strides; weight: the packed ``Params4bit`` (or its data) and
    ``quant_state`` its bitsandbytes QuantState; bias: (out_features,) or None. Returns [..., out_features] in
    x's dtype. Gradients: x (``dy·deq(W)``, W decoded again in the backward, never kept between the two) and
    bias; W gets none. The path comes from ``dispatch.BASE_PATH_STEPS``: on CUDA that is bitsandbytes' own
    ``matmul_4bit`` where it measured faster ("bitsandbytes"), elsewhere lora_engine's kernels.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, bias)):
        return reference.linear_4bit(x, weight, quant_state, bias)
    packed = _packed_weight(weight, quant_state, "linear_4bit")
    check_linear_args(x, packed.n, packed.k, bias, packed.data.device)
    return _linear_4bit(x, weight, quant_state, packed, bias)


def _linear_4bit(
    x: torch.Tensor, weight: torch.Tensor, quant_state: Any, packed: Packed4bit, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """:func:`linear_4bit` on checked operands (``packed``: the weight's kernel operands)."""
    x2d = _rows(x, packed.k)
    path = _resolve_path(x2d.shape[0], packed, x.device, base_only=True)
    if path == "bitsandbytes":
        import bitsandbytes as bnb

        # exactly what bnb.nn.Linear4bit.forward calls (its own kernels and autograd)
        return bnb.matmul_4bit(x, weight, bias=bias, quant_state=quant_state)
    if torch.compiler.is_compiling():
        from .custom_ops import linear_4bit as linear_4bit_op

        return _unrows(linear_4bit_op(x2d, packed, bias, path), x, packed.n)
    autograd = _autograd()
    with dispatch.device_guard(x.device):
        if torch.is_grad_enabled() and (x2d.requires_grad or (bias is not None and bias.requires_grad)):
            y = autograd.Linear4bitFunction.apply(x2d, bias, packed, path)
        else:  # inference: the same kernels without autograd's bookkeeping
            y = autograd.linear_forward(x2d, bias, packed, path)
    return _unrows(y, x, packed.n)


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
    """A mixed batch of LoRA adapters over a frozen bitsandbytes 4-bit weight, each row of x with its own adapter:

        y[m] = x[m]·deq(W)ᵀ + s_i·(x[m]·A_iᵀ)·B_iᵀ + bias,   i = adapter_indices[m]   (-1: the base alone)

    lora_As[i]: (r_i, in_features), lora_Bs[i]: (out_features, r_i), scalings[i]: a number; ranks may differ.
    adapter_indices: integers of shape ``x.shape[:-1]`` (one per row) or ``(x.shape[0],)`` (one per sample). The
    base product runs once for every row (what :func:`linear_4bit` runs), then two kernels add the low-rank terms
    with the rows grouped by adapter: a shrink (``x·A_iᵀ``) and an expand (``s_i·left·B_iᵀ`` into y). The factors
    are stacked, zero-padded to the largest rank, on every call. No dropout. Gradients for x, bias and every
    factor: dx through the base path and the same two kernels, the factors' by torch products per adapter
    (``autograd.MultiLoraFunction``; the base product then takes the LoRA layers' path table, not the base-only
    one). Under ``torch.compile`` the same code runs as a registered custom op (``custom_ops.multi_lora_linear``),
    forward and backward, without a graph break: the grouping of rows by adapter happens inside it, and the range
    of the indices is asserted on their device instead of read on the host.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, bias, *lora_As, *lora_Bs)):
        return reference.multi_lora_linear_4bit(
            x, weight, quant_state, lora_As, lora_Bs, scalings, adapter_indices, bias
        )
    packed = _packed_weight(weight, quant_state, "multi_lora_linear_4bit")
    indices = check_multi_lora_args(
        x, packed.n, packed.k, lora_As, lora_Bs, scalings, adapter_indices, bias, packed.data.device
    )
    if not lora_As:
        return linear_4bit(x, weight, quant_state, bias)  # checks x and bias, which no adapter's check did
    adapter = MultiLora(tuple(lora_As), tuple(lora_Bs), tuple(float(s) for s in scalings), indices)
    trains = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, *lora_As, *lora_Bs))
    if torch.compiler.is_compiling():
        return _unrows(_multi_lora_compiled(x, weight, quant_state, packed, adapter, bias, trains), x, packed.n)
    autograd = _autograd()
    x2d = _rows(x, packed.k)
    if trains:
        path = _resolve_path(x2d.shape[0], packed, x.device)
        with dispatch.device_guard(x.device):
            y = autograd.MultiLoraFunction.apply(x2d, bias, packed, path, adapter, *lora_As, *lora_Bs)
        return _unrows(y, x, packed.n)
    y = _linear_4bit(x, weight, quant_state, packed, bias)  # the base product, once for every row (x, bias checked)
    with dispatch.device_guard(x.device):
        y2d = _rows(y, packed.n)
        autograd.multi_lora_add_(adapter, x2d, y2d)
    return _unrows(y2d, x, packed.n)


def _multi_lora_compiled(
    x: torch.Tensor, weight: torch.Tensor, quant_state: Any, packed: Packed4bit, adapter: MultiLora,
    bias: Optional[torch.Tensor], trains: bool,
) -> torch.Tensor:
    """:func:`multi_lora_linear_4bit` under ``torch.compile``, through the mixed-batch custom op: the eager code, with
    the rows grouped by adapter inside it, so the graph has no data-dependent shape. The paths are eager's: the LoRA
    layers' table with gradients, the base-only one without. Where that one picks bitsandbytes (CUDA), the base
    product is traced as :func:`linear_4bit` traces it and the op adds the low-rank terms to it."""
    from .custom_ops import multi_lora_linear

    x2d = _rows(x, packed.k)
    if trains:
        path = _resolve_path(x2d.shape[0], packed, x.device)
        return multi_lora_linear(x2d, packed, adapter, bias, path)
    path = _resolve_path(x2d.shape[0], packed, x.device, base_only=True)
    if path == "bitsandbytes":
        base = _rows(_linear_4bit(x, weight, quant_state, packed, bias), packed.n)
        return multi_lora_linear(x2d, packed, adapter, None, path, base=base)
    return multi_lora_linear(x2d, packed, adapter, bias, path)


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
    """``y = x·Wᵀ + scaling·(drop(x)·Aᵀ)·Bᵀ + bias`` with W a frozen dense [out_features, in_features] weight."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, weight, lora_A, lora_B, bias)):
        return reference.lora_linear(
            x, weight, lora_A, lora_B, scaling, bias, dropout_p, training, dropout_seed=dropout_seed
        )
    n, k = check_dense_weight(weight, "lora_linear")
    check_lora_linear_args(x, n, k, lora_A, lora_B, scaling, bias, dropout_p, weight.device, dropout_seed)
    return _apply(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training, dropout_seed)


def lowrank_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: Any,
    left: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x·deq(W)ᵀ + scaling·left·Bᵀ + bias`` with W a frozen bitsandbytes 4-bit weight and the left factor
    computed by the caller: LoRA whose ``left = lora_A(drop(x))`` only lora_A's own module can produce (FSDP gathers a
    module sharded on its own in its forward alone).

    x: [..., in_features] fp16/bf16/fp32; left: [..., r] with x's leading shape, any float dtype; lora_B:
    (out_features, r), any strides (e.g. ``lora_B_module(eye(r)).t()``). One GEMM with the low-rank term in its
    epilogue, as :func:`lora_linear_4bit` runs. Gradients: left (``scaling·dy·B``, which flows on to A and x through
    the graph that made it), lora_B, bias, and x (``dy·deq(W)`` only: the left factor's share comes through left).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, left, lora_B, bias)):
        return reference.lowrank_linear_4bit(x, weight, quant_state, left, lora_B, scaling, bias)
    packed = _packed_weight(weight, quant_state, "lowrank_linear_4bit")
    check_lowrank_linear_args(x, packed.n, packed.k, left, lora_B, scaling, bias, packed.data.device)
    return _apply_adapter(x, packed, LowRank(_rows(left, lora_B.shape[1]), lora_B, float(scaling)), bias)


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    left: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`lowrank_linear_4bit` over a frozen dense [out_features, in_features] weight."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, weight, left, lora_B, bias)):
        return reference.lowrank_linear(x, weight, left, lora_B, scaling, bias)
    n, k = check_dense_weight(weight, "lowrank_linear")
    check_lowrank_linear_args(x, n, k, left, lora_B, scaling, bias, weight.device)
    return _apply_adapter(x, weight, LowRank(_rows(left, lora_B.shape[1]), lora_B, float(scaling)), bias)


def ia3_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: Any,
    ia3_l: torch.Tensor,
    scales_input: bool,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """IA3 over a frozen bitsandbytes 4-bit weight: ``(x ⊙ l)·deq(W)ᵀ + bias`` when ``scales_input`` (PEFT's
    feed-forward layers), else ``(x·deq(W)ᵀ + bias) ⊙ l``.

    x: [..., in_features] fp16/bf16/fp32; ia3_l: (in_features,) or (out_features,), any float dtype (the scale
    multiplies in fp32, the product runs in x's dtype); bias: (out_features,). Returns [..., out_features] in x's
    dtype. The scale is fused into the GEMM's prologue or epilogue, forward and backward.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, ia3_l, bias)):
        return reference.ia3_linear_4bit(x, weight, quant_state, ia3_l, scales_input, bias)
    packed = _packed_weight(weight, quant_state, "ia3_linear_4bit")
    check_ia3_linear_args(x, packed.n, packed.k, ia3_l, scales_input, bias, packed.data.device)
    return _apply_adapter(x, packed, IA3(ia3_l.contiguous(), scales_input), bias)


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    ia3_l: torch.Tensor,
    scales_input: bool,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """IA3 over a frozen dense [out_features, in_features] weight (see :func:`ia3_linear_4bit`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, weight, ia3_l, bias)):
        return reference.ia3_linear(x, weight, ia3_l, scales_input, bias)
    n, k = check_dense_weight(weight, "ia3_linear")
    check_ia3_linear_args(x, n, k, ia3_l, scales_input, bias, weight.device)
    return _apply_adapter(x, weight, IA3(ia3_l.contiguous(), scales_input), bias)


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
    """DoRA over a frozen bitsandbytes 4-bit weight: ``g ⊙ (x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ) + bias`` with
    ``g = magnitude / ‖deq(W) + s·B·A‖`` per output row, the norm not differentiated (PEFT's convention).

    lora_A: (r, in_features); lora_B: (out_features, r); magnitude: (out_features,). Dropout applies when
    ``training`` and ``dropout_p > 0``, with PEFT's rule for DoRA: the base product of x as is, plus the DoRA term of
    the dropped input xd, ``x·deq(W)ᵀ + bias + (g − 1) ⊙ (xd·deq(W)ᵀ) + g ⊙ s·(xd·Aᵀ)·Bᵀ``; the mask is drawn
    in-kernel from a seed (``dropout_seed``, or one drawn from torch's CPU generator, as in
    :func:`lora_linear_4bit`) and redrawn in the backward. The row norm comes from ‖W‖² (once per weight), one GEMM
    of A over the 4-bit W and rank-r products: never a dense W + s·B·A. Under ``torch.compile`` the same kernels
    run as the registered adapter op (a seed left to draw is drawn as a tensor there, so the graph does not break).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, lora_A, lora_B, magnitude, bias)):
        return reference.dora_linear_4bit(
            x, weight, quant_state, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training,
            dropout_seed=dropout_seed,
        )  # fmt: skip
    packed = _packed_weight(weight, quant_state, "dora_linear_4bit")
    check_lora_linear_args(x, packed.n, packed.k, lora_A, lora_B, scaling, bias, dropout_p, packed.data.device,
                           dropout_seed)  # fmt: skip
    check_dora_magnitude(magnitude, packed.n, x)
    return _apply_dora(x, packed, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training, dropout_seed)


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
    """DoRA over a frozen dense [out_features, in_features] weight (see :func:`dora_linear_4bit`): ‖W‖² once per
    weight, then one GEMM of A over W and rank-r products per call for the row norm, never a dense W + s·B·A.

    ``norm_weight``: where ``weight`` is a copy cast for this call (autocast over an fp32 parameter, as ``F.linear``
    casts it), the weight it was cast from. ‖W‖² is then read from that one, once, as PEFT reads the norm from the
    uncast weight, instead of from a new copy on every call (an fp32 pass over W each time).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not dispatch.use_triton(x.device, _dtypes(x, weight, lora_A, lora_B, magnitude, bias)):
        return reference.dora_linear(
            x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training, dropout_seed=dropout_seed,
            norm_weight=norm_weight,
        )  # fmt: skip
    n, k = check_dense_weight(weight, "dora_linear")
    check_lora_linear_args(x, n, k, lora_A, lora_B, scaling, bias, dropout_p, weight.device, dropout_seed)
    check_dora_magnitude(magnitude, n, x)
    if norm_weight is not None:
        check_norm_weight(norm_weight, weight, "dora_linear")
    return _apply_dora(
        x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, training, dropout_seed, norm_weight
    )


def _apply_dora(
    x: torch.Tensor,
    weight: Packed4bit | torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    dropout_p: float,
    training: bool,
    dropout_seed: Optional[int],
    norm_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The DoRA bundle over a checked 4-bit or dense weight, its ‖W‖² (of ``norm_weight`` where given) from the
    per-weight cache, through the kernels."""
    norm_source = weight if norm_weight is None else norm_weight
    if torch.compiler.is_compiling():
        from .custom_ops import row_norms_sq  # traced tensors have no address to look the cache up by

        base_norm_sq = row_norms_sq(norm_source)
    else:
        with dispatch.device_guard(x.device):
            base_norm_sq = row_norms_sq_cached(norm_source)
    adapter = Dora(lora_A, lora_B, magnitude, float(scaling), base_norm_sq)
    p = float(dropout_p) if training and dropout_p > 0 else 0.0
    return _apply_adapter(x, weight, adapter, bias, p, dropout_seed)


def _apply_adapter(
    x: torch.Tensor,
    weight: Packed4bit | torch.Tensor,
    adapter: Adapter,
    bias: Optional[torch.Tensor],
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
) -> torch.Tensor:
    """Any adapter kind on x of any leading shape: the kind's kernels, with autograd when needed (under
    ``torch.compile``, the registered adapter op). ``dropout_p`` > 0 (the caller passes 0 outside training) turns
    on the adapter's dropout (DoRA's), its seed ``dropout_seed`` or a draw from torch's CPU generator."""
    in_features = x.shape[-1]
    x2d = _rows(x, in_features)
    is_4bit = isinstance(weight, Packed4bit)
    out_features = weight.n if is_4bit else weight.shape[0]
    path = _resolve_path(x2d.shape[0], weight, x.device) if is_4bit else "dense"
    trainables = adapter.trainables()
    if torch.compiler.is_compiling():
        # the registered adapter op runs the same forward and backward, opaque to the compiler (no graph break)
        from .custom_ops import adapter_linear

        y = adapter_linear(x2d, weight, adapter, bias, path, dropout_p, dropout_seed)
        return _unrows(y, x, out_features)
    if dropout_p > 0:
        seed = reference.draw_dropout_seed() if dropout_seed is None else int(dropout_seed)
        adapter = adapter._replace(dropout=Dropout(seed, float(dropout_p), in_features))
    autograd = _autograd()  # imports Triton, which only this path needs
    with dispatch.device_guard(x.device):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, bias, *trainables)):
            y = autograd.AdapterLinearFunction.apply(x2d, bias, weight, path, adapter, *trainables)
        else:  # inference: the same kernels without autograd's bookkeeping
            y, _ = autograd.KINDS[type(adapter)].forward(adapter, x2d, bias, weight, path, (False,) * len(trainables))
    return _unrows(y, x, out_features)


def _packed_weight(weight: torch.Tensor, quant_state: Any, caller: str) -> Packed4bit:
    """The kernels' operands of a frozen 4-bit weight, checked. Eager calls validate and build them once per weight
    and read it with bitsandbytes' ``__torch_function__`` off (through ``Params4bit`` an attribute costs ~3 µs; the
    bytes and flags are the same). Traced tensors have no address to key the cache on: built in each trace."""
    if torch.compiler.is_compiling():
        check_frozen_weight(weight, caller)
        return packed_4bit(weight, quant_state)
    with torch._C.DisableTorchFunctionSubclass():
        check_frozen_weight(weight, caller)
        return packed_4bit_cached(weight, quant_state)


_AUTOGRAD: Optional[ModuleType] = None


def _autograd() -> ModuleType:
    """``lora_engine.autograd``, imported by the first kernel call (it imports Triton, which only that path needs);
    kept here, since an import statement costs µs on every call."""
    global _AUTOGRAD
    if _AUTOGRAD is None:
        from . import autograd

        _AUTOGRAD = autograd
    return _AUTOGRAD


def _dtypes(*tensors: Optional[torch.Tensor]) -> list[torch.dtype]:
    return [t.dtype for t in tensors if isinstance(t, torch.Tensor)]


def _rows(x: torch.Tensor, features: int) -> torch.Tensor:
    """x as [rows, features]: x itself when it is 2-D already (a reshape would make a view per call)."""
    return x if x.dim() == 2 else x.reshape(-1, features)


def _unrows(y: torch.Tensor, x: torch.Tensor, features: int) -> torch.Tensor:
    """The 2-D result ``y`` of ``_rows(x)`` in x's leading shape with ``features`` columns."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], features)


def _resolve_path(num_tokens: int, weight: Packed4bit, device: torch.device, base_only: bool = False) -> str:
    """The dispatcher's path for this call, with "gemv" replaced by "dequant" where the GEMV cannot serve it
    (and, for a ``base_only`` call, "bitsandbytes" by "dequant" off CUDA, where bitsandbytes' kernels do not run
    on the weight as the kernels read it)."""
    path = dispatch.choose_path(num_tokens, weight.n, weight.k, device, base_only=base_only)
    if path == "bitsandbytes" and device.type != "cuda":
        dispatch.report_once(
            "bitsandbytes-off-cuda",
            f"lora_engine: the bitsandbytes path serves CUDA tensors only; calls on {device.type} take the "
            "dequant path",
        )
        return "dequant"
    if path != "gemv":
        return path
    from .kernels.lora_gemv import gemv_supported

    if not gemv_supported(num_tokens, weight):
        dispatch.report_once(
            "gemv-unsupported",
            "lora_engine: the gemv path serves at most 16 tokens over a 4-bit weight whose in_features are a multiple "
            "of its blocksize; other calls take the dequant path",
        )
        path = "dequant"
    return path


def _apply(
    x: torch.Tensor,
    weight: Packed4bit | torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    dropout_p: float,
    training: bool,
    dropout_seed: Optional[int],
) -> torch.Tensor:
    in_features = x.shape[-1]
    out_features = lora_B.shape[0]
    x2d = _rows(x, in_features)
    device = x.device
    is_4bit = isinstance(weight, Packed4bit)
    path = _resolve_path(x2d.shape[0], weight, device) if is_4bit else "dense"
    if torch.compiler.is_compiling():
        # The registered custom op runs the same forward and backward, opaque to the compiler (no graph break).
        # Eager calls skip it: its dispatch costs ~10x an autograd.Function call on the host (~170 vs ~12 µs
        # measured on a CI CPU core), which small layers would feel.
        from .custom_ops import lora_linear as lora_linear_op

        p = float(dropout_p) if training else 0.0
        y = lora_linear_op(x2d, weight, lora_A, lora_B, bias, scaling, p, dropout_seed, path)
        return _unrows(y, x, out_features)
    autograd = _autograd()  # imports Triton, which only this path needs
    dropout = None
    if training and dropout_p > 0:
        seed = reference.draw_dropout_seed() if dropout_seed is None else int(dropout_seed)
        dropout = Dropout(seed, float(dropout_p), in_features)
    trains = x.requires_grad or lora_A.requires_grad or lora_B.requires_grad or bias is not None and bias.requires_grad
    with dispatch.device_guard(device):
        if trains and torch.is_grad_enabled():
            adapter = Lora(lora_A, lora_B, float(scaling), dropout)
            y = autograd.AdapterLinearFunction.apply(x2d, bias, weight, path, adapter, lora_A, lora_B)
        else:  # inference: the same kernels without autograd's bookkeeping
            y, _ = autograd.lora_forward(
                x2d, lora_A, lora_B, bias, weight, float(scaling), dropout, path, keep_left=False
            )
    return _unrows(y, x, out_features)


def dequantize_4bit(weight: torch.Tensor, quant_state: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense [N, K] copy of a bitsandbytes 4-bit weight (one Triton launch; the reference where Triton can't run)."""
    dtype = dtype or quant_state.dtype
    device = packed_bytes(weight).device
    if not dispatch.use_triton(device, (dtype,)):
        return reference.dequantize_4bit(weight, quant_state, dtype)
    from .kernels.dequantize import dequantize_4bit as dequantize_kernel

    with dispatch.device_guard(device):
        return dequantize_kernel(packed_4bit_cached(weight, quant_state), dtype)

"""Argument checks shared by every backend: bad input fails loudly, naming the problem and the sizes."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .dispatch import host_to_device

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DROPOUT_SEED_LIMIT = 2**63  # seeds are int64 on the host and in the kernels (two 32-bit Philox key words)


def check_frozen_weight(weight: torch.Tensor, function: str) -> None:
    """The base weight gets no gradient: refuse one that asks for it rather than leave it silently untrained."""
    if weight.requires_grad:
        raise ValueError(
            f"{function} keeps the base weight frozen but weight.requires_grad is True; call "
            "weight.requires_grad_(False) (train the LoRA factors, or use a dense layer to train the weight)"
        )


def check_dense_weight(weight: Any, function: str) -> tuple[int, int]:
    """A frozen dense weight [out_features, in_features]: returns (out_features, in_features)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{function}: weight must be a 2-D tensor [out_features, in_features], got {got}")
    check_frozen_weight(weight, function)
    return weight.shape[0], weight.shape[1]


def check_lora_linear_args(
    x: torch.Tensor,
    out_features: int,
    in_features: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    dropout_p: float,
    weight_device: torch.device,
    dropout_seed: Optional[int] = None,
) -> None:
    """Validate ``y = x·Wᵀ + scaling·(drop(x)·Aᵀ)·Bᵀ + bias`` for W of shape [out_features, in_features]."""
    _check_input(x, in_features)
    _check_float_tensors(lora_A=lora_A, lora_B=lora_B)
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    rank = lora_A.shape[0]
    if rank == 0:
        raise ValueError("LoRA rank r must be >= 1, got lora_A of shape (0, ...)")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be (r, in_features) = (r, {in_features}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must be (out_features, r) = ({out_features}, {rank}), got {tuple(lora_B.shape)}")
    _check_bias(bias, out_features)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite Python number, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None and (
        not isinstance(dropout_seed, int)
        or isinstance(dropout_seed, bool)
        or not 0 <= dropout_seed < DROPOUT_SEED_LIMIT
    ):
        raise ValueError(f"dropout_seed must be an int in [0, 2**63) or None, got {dropout_seed!r}")
    _check_devices(x, weight_device, lora_A=lora_A, lora_B=lora_B, bias=bias)


def check_lowrank_linear_args(
    x: torch.Tensor,
    out_features: int,
    in_features: int,
    left: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
    weight_device: torch.device,
) -> None:
    """Validate ``y = x·Wᵀ + scaling·left·Bᵀ + bias`` for W of shape [out_features, in_features], left [..., r]
    with x's leading shape."""
    _check_input(x, in_features)
    _check_float_tensors(left=left, lora_B=lora_B)
    if lora_B.dim() != 2 or lora_B.shape[0] != out_features or lora_B.shape[1] == 0:
        raise ValueError(f"lora_B must be (out_features, r) = ({out_features}, r >= 1), got {tuple(lora_B.shape)}")
    rank = lora_B.shape[1]
    if tuple(left.shape) != (*x.shape[:-1], rank):
        raise ValueError(
            f"left must have x's leading shape and r={rank} columns, {(*x.shape[:-1], rank)}, got {tuple(left.shape)}"
        )
    _check_bias(bias, out_features)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite Python number, got {scaling!r}")
    _check_devices(x, weight_device, left=left, lora_B=lora_B, bias=bias)


def check_linear_args(
    x: torch.Tensor, out_features: int, in_features: int, bias: Optional[torch.Tensor], weight_device: torch.device
) -> None:
    """Validate ``y = x·Wᵀ + bias`` for W of shape [out_features, in_features] (a layer without an adapter)."""
    _check_input(x, in_features)
    _check_bias(bias, out_features)
    _check_devices(x, weight_device, bias=bias)


def _check_input(x: torch.Tensor, in_features: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must be in_features={in_features}, got x of shape {tuple(x.shape)}")


def _check_float_tensors(**named: Any) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")


def _check_bias(bias: Optional[torch.Tensor], out_features: int) -> None:
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError("bias must be a floating point tensor or None")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be (out_features,) = ({out_features},), got {tuple(bias.shape)}")


def _check_devices(x: torch.Tensor, weight_device: torch.device, **others: Optional[torch.Tensor]) -> None:
    """Every operand on x's device (the weight's device given apart: a 4-bit weight is several tensors)."""
    named = [("weight", weight_device)] + [(name, t.device) for name, t in others.items() if t is not None]
    for name, device in named:
        if device != x.device:
            raise ValueError(f"{name} is on {device} but x is on {x.device}: all operands must share one device")


def check_ia3_linear_args(
    x: torch.Tensor,
    out_features: int,
    in_features: int,
    ia3_l: torch.Tensor,
    scales_input: bool,
    bias: Optional[torch.Tensor],
    weight_device: torch.device,
) -> None:
    """Validate ``(x ⊙ l)·Wᵀ + bias`` (``scales_input``) or ``(x·Wᵀ + bias) ⊙ l`` for W [out_features, in_features]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must be in_features={in_features}, got x of shape {tuple(x.shape)}")
    if not isinstance(scales_input, bool):
        raise TypeError(f"scales_input must be a bool, got {scales_input!r}")
    if not isinstance(ia3_l, torch.Tensor):
        raise TypeError(f"ia3_l must be a tensor, got {type(ia3_l).__name__}")
    if not ia3_l.dtype.is_floating_point:
        raise TypeError(f"ia3_l must be floating point, got {ia3_l.dtype}")
    side, size = ("in_features", in_features) if scales_input else ("out_features", out_features)
    if tuple(ia3_l.shape) != (size,):
        raise ValueError(
            f"ia3_l must be a vector ({side},) = ({size},) when scales_input={scales_input}, got {tuple(ia3_l.shape)}"
            " (flatten PEFT's (1, in_features) or (out_features, 1) parameter)"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError("bias must be a floating point tensor or None")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be (out_features,) = ({out_features},), got {tuple(bias.shape)}")
    for name, device in (("weight", weight_device), ("ia3_l", ia3_l.device), ("bias", getattr(bias, "device", None))):
        if device is not None and device != x.device:
            raise ValueError(f"{name} is on {device} but x is on {x.device}: all operands must share one device")


def check_dora_magnitude(magnitude: torch.Tensor, out_features: int, x: torch.Tensor) -> None:
    """The DoRA magnitude: a floating point vector (out_features,) on x's device."""
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a tensor, got {type(magnitude).__name__}")
    if not magnitude.dtype.is_floating_point:
        raise TypeError(f"magnitude must be floating point, got {magnitude.dtype}")
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"magnitude must be (out_features,) = ({out_features},), got {tuple(magnitude.shape)}")
    if magnitude.device != x.device:
        raise ValueError(
            f"magnitude is on {magnitude.device} but x is on {x.device}: all operands must share one device"
        )


def check_norm_weight(norm_weight: Any, weight: torch.Tensor, function: str) -> None:
    """DoRA's ``norm_weight``: the frozen dense weight ``weight`` was cast from, of its shape and on its device."""
    if not isinstance(norm_weight, torch.Tensor):
        raise TypeError(f"{function}: norm_weight must be a tensor, got {type(norm_weight).__name__}")
    if norm_weight.shape != weight.shape:
        raise ValueError(
            f"{function}: norm_weight has shape {tuple(norm_weight.shape)} but weight {tuple(weight.shape)}: it must "
            "be the weight that weight was cast from"
        )
    if not norm_weight.dtype.is_floating_point:
        raise TypeError(f"{function}: norm_weight must be floating point, got {norm_weight.dtype}")
    if norm_weight.device != weight.device:
        raise ValueError(f"{function}: norm_weight is on {norm_weight.device} but weight on {weight.device}")
    if norm_weight.requires_grad:
        raise ValueError(f"{function}: norm_weight.requires_grad is True; it stands for the frozen base weight")


def check_multi_lora_args(
    x: torch.Tensor,
    out_features: int,
    in_features: int,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_indices: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight_device: torch.device,
) -> torch.Tensor:
    """Validate a mixed batch and return the adapter of every row of x as int64 [rows] on x's device.

    ``adapter_indices``: integers in [-1, len(lora_As)) (-1: the base alone), of shape ``x.shape[:-1]`` (one per
    row) or ``(x.shape[0],)`` (one per sample, for every row of that sample). The range is checked on the host: free
    for indices held on the CPU (then copied to x's device without a stream sync), one device sync for indices
    already on an accelerator. Where nothing may be read back, an asynchronous assertion on the indices' device
    checks it instead (``torch._assert_async``: a RuntimeError on the CPU, a device-side assert on CUDA): while a
    CUDA graph is captured (it then runs at every replay; CPU indices cannot be captured: see
    ``dispatch.host_to_device``), and while ``torch.compile`` traces the call (it then runs at every call of the
    compiled graph; a host read would break the graph).
    """
    if not isinstance(lora_As, (list, tuple)) or not isinstance(lora_Bs, (list, tuple)):
        raise TypeError("lora_As and lora_Bs must be lists or tuples of tensors, one pair per adapter")
    if not isinstance(scalings, (list, tuple)):
        raise TypeError("scalings must be a list or tuple of Python numbers, one per adapter")
    if not (len(lora_As) == len(lora_Bs) == len(scalings)):
        raise ValueError(
            f"one lora_A, lora_B and scaling per adapter: got {len(lora_As)}, {len(lora_Bs)} and {len(scalings)}"
        )
    for i, (lora_A, lora_B, scaling) in enumerate(zip(lora_As, lora_Bs, scalings)):
        try:
            check_lora_linear_args(x, out_features, in_features, lora_A, lora_B, scaling, bias, 0.0, weight_device)
        except (TypeError, ValueError) as error:
            raise type(error)(f"adapter {i}: {error}") from None
    if not isinstance(adapter_indices, torch.Tensor):
        raise TypeError(f"adapter_indices must be an integer tensor, got {type(adapter_indices).__name__}")
    dtype = adapter_indices.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"adapter_indices must be an integer tensor, got {adapter_indices.dtype}")
    leading = tuple(x.shape[:-1])
    shape = tuple(adapter_indices.shape)
    if shape != leading and not (len(leading) >= 1 and shape == leading[:1]):
        raise ValueError(
            f"adapter_indices must have shape x.shape[:-1] = {leading} (one per row) or ({leading[:1]}) (one per "
            f"sample), got {shape}"
        )
    out_of_range = (adapter_indices < -1) | (adapter_indices >= len(lora_As))
    tracing = torch.compiler.is_compiling()
    if tracing or (adapter_indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        # nothing can be read back while a CUDA graph is captured, nor while torch.compile traces (a graph break):
        # the check runs on the device at every replay / every call of the compiled graph
        torch._assert_async(~out_of_range.any(), f"adapter_indices must lie in [-1, {len(lora_As)})")
    elif adapter_indices.numel() and bool(out_of_range.any()):
        raise ValueError(
            f"adapter_indices must lie in [-1, {len(lora_As)}) (-1: the base alone), got values from "
            f"{int(adapter_indices.min())} to {int(adapter_indices.max())}"
        )
    indices = adapter_indices.to(torch.int64)
    if indices.device.type == "cpu" and not tracing:  # eager calls stage the copy; a traced one is the compiler's
        indices = host_to_device(indices, x.device, "adapter_indices")
    else:
        indices = indices.to(x.device)
    if shape != leading:  # one per sample: the same adapter for every row of the sample
        indices = indices.reshape(-1, *([1] * (len(leading) - 1))).expand(leading)
    return indices.reshape(-1)

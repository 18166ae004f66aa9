"""Test utilities: the three-way tolerance rule and failure messages that say where and how much."""

from __future__ import annotations

from typing import Optional

import torch


def describe_mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, bound: float) -> str:
    """Count, worst index and NaN/Inf disagreements between ``actual`` and ``expected``."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs().nan_to_num(nan=float("inf"))
    bad = err > bound
    worst = int(err.reshape(-1).argmax()) if err.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)) if err.numel() else ()
    nan_mismatch = int((a.isnan() != e.isnan()).sum())
    inf_mismatch = int((a.isinf() != e.isinf()).sum())
    return (
        f"{name}: {int(bad.sum())}/{err.numel()} elements off by more than {bound:.3g}; worst at {index}: "
        f"actual {a.reshape(-1)[worst].item():.6g} vs expected {e.reshape(-1)[worst].item():.6g} "
        f"(|err| {err.reshape(-1)[worst].item():.3g}); NaN mismatches {nan_mismatch}, Inf mismatches {inf_mismatch}"
    )


def assert_close_3way(
    name: str,
    actual: torch.Tensor,
    precise: torch.Tensor,
    same_dtype: torch.Tensor,
    atol: Optional[float] = None,
) -> None:
    """``max|actual - precise| <= 2 * max|same_dtype - precise| + atol``.

    ``precise`` is the computation in float64; ``same_dtype`` is plain torch in ``actual``'s dtype, so the
    kernel may err at most twice as much as torch itself does. ``atol`` defaults to four ulps of the output's
    largest magnitude: where an output's error comes from a few independent rounding chains (at M = 1 the
    gradient of B is dy times the one row of x·Aᵀ), the maximum is noisy; over 30 seeds the kernel's and torch's
    errors on x·Aᵀ at M = 1 had a median ratio of 1.0 and a worst of 2.9. A wrong index, mask or scale is off
    by orders of magnitude more. NaN and Inf must appear exactly where the precise result has them.
    """
    assert actual.shape == precise.shape == same_dtype.shape, (
        f"{name}: shapes differ: {tuple(actual.shape)}, {tuple(precise.shape)}, {tuple(same_dtype.shape)}"
    )
    a, p, s = actual.double(), precise.double(), same_dtype.double()
    finite = p.isfinite()
    scale = p[finite].abs().max().item() if finite.any() else 0.0
    if atol is None:
        atol = 4 * torch.finfo(actual.dtype).eps * max(scale, 1e-30)
    torch_err = (s - p)[finite].abs().max().item() if finite.any() else 0.0
    bound = 2.0 * torch_err + atol
    if (a.isnan() != p.isnan()).any() or (a.isinf() != p.isinf()).any():
        raise AssertionError(describe_mismatch(name, actual, precise, bound))
    if not finite.any():
        return
    if ((a - p)[finite].abs().max().item()) > bound:
        message = describe_mismatch(name, actual, precise, bound)
        raise AssertionError(f"{message} [torch {actual.dtype} err {torch_err:.3g}]")


def normalize_zero_sign(t: torch.Tensor) -> torch.Tensor:
    """``-0.0`` -> ``+0.0`` (bitsandbytes' CPU and CUDA kernels disagree on the sign of a zero code)."""
    return torch.where(t == 0, torch.zeros_like(t), t)


def assert_bitwise_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits (zeros compared without sign; NaNs by bit pattern)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{name}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
    )
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a = normalize_zero_sign(actual).contiguous().view(int_type)
    e = normalize_zero_sign(expected).contiguous().view(int_type)
    if not torch.equal(a, e):
        differ = (a != e).nonzero()
        first = tuple(int(i) for i in differ[0])
        raise AssertionError(
            f"{name}: {differ.shape[0]}/{a.numel()} elements differ in bits; first at {first}: "
            f"{actual[first].item()!r} vs {expected[first].item()!r}"
        )

"""Gradients of gradients (``create_graph=True``: gradient penalties, meta-learning) are exact on every path.

The Triton path recomputes the layer's gradients with torch operations when a backward must itself be
differentiable; the reference is plain torch autograd. Both run in fp32 from the same decoded weight, so they
agree to fp32 rounding (a few ulps of K-long sums: 1e-4 relative leaves a wide margin), while a dropped
second-order term changes the result by tens of percent (|dA| 148 against 2035 in the report that found it).
The gradients here reach a few thousand, so the bound is relative to the largest value.
"""

from __future__ import annotations

import logging

import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_engine
from lora_engine import dispatch

pytestmark = pytest.mark.interpreter

RTOL = 1e-4  # of the largest value of each gradient


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    worst = (got - want).abs().max().item()
    bound = RTOL * want.abs().max().item()
    assert worst <= bound, f"{what}: max |difference| {worst:.3g} > {bound:.3g} (1e-4 of max |value|)"


def _operands(device: str, bias: bool):
    torch.manual_seed(0)
    packed, state = bnbF.quantize_4bit(torch.randn(37, 96, device=device), blocksize=64, quant_type="nf4")
    x = torch.randn(6, 96, device=device)
    lora_A, lora_B = torch.randn(8, 96, device=device) * 0.3, torch.randn(37, 8, device=device) * 0.3
    b = torch.randn(37, device=device) if bias else None
    return x, packed, state, lora_A, lora_B, b


def _penalised_grads(backend: str, path: str, dropout_p: float, device: str, bias: bool):
    """Gradients of ``loss + |d loss / dA|² + |d loss / dx|²`` with respect to x, A, B and the bias."""
    x, packed, state, lora_A, lora_B, b = _operands(device, bias)
    leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B)] + ([b.clone().requires_grad_()] if bias else [])
    with lora_engine.use_backend(backend), lora_engine.force_path(path):
        y = lora_engine.lora_linear_4bit(
            leaves[0], packed, state, leaves[1], leaves[2], 1.5, bias=leaves[3] if bias else None,
            dropout_p=dropout_p, training=dropout_p > 0, dropout_seed=1234,
        )  # fmt: skip
        loss = (y.sin() * torch.linspace(-1, 1, y.shape[1], device=device)).sum()
        d_x, d_A = torch.autograd.grad(loss, [leaves[0], leaves[1]], create_graph=True)
        (loss + d_A.square().sum() + d_x.square().sum()).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("path", ["dequant", "fused", "dequant_cublas"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_second_order_gradients_match_torch_autograd(path, dropout_p, kernel_device):
    got = _penalised_grads("triton", path, dropout_p, kernel_device, bias=True)
    want = _penalised_grads("torch", path, dropout_p, kernel_device, bias=True)
    for name, g, w in zip(("x", "lora_A", "lora_B", "bias"), got, want):
        _assert_close(g, w, f"{name} on path {path}")
    first_order_only = _first_order_grad_of_A(kernel_device)
    moved = (want[1] - first_order_only).abs().max() / want[1].abs().max()
    assert moved > 100 * RTOL, "the penalty must move dA far beyond the tolerance, or this proves nothing"


def _first_order_grad_of_A(device: str) -> torch.Tensor:
    x, packed, state, lora_A, lora_B, b = _operands(device, True)
    lora_A = lora_A.clone().requires_grad_()
    with lora_engine.use_backend("torch"):
        y = lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 1.5, bias=b)
        (y.sin() * torch.linspace(-1, 1, y.shape[1], device=device)).sum().backward()
    return lora_A.grad


def test_double_backward_is_reported_once(monkeypatch, caplog, kernel_device):
    monkeypatch.setattr(dispatch, "_reported", set())
    with caplog.at_level(logging.WARNING, logger="lora_engine"):
        for _ in range(2):
            _penalised_grads("triton", "dequant", 0.0, kernel_device, bias=False)
    assert sum("create_graph=True" in r.getMessage() for r in caplog.records) == 1


def test_plain_backward_still_runs_the_kernels(monkeypatch, kernel_device):
    """Only a differentiable backward takes the torch route: an ordinary one never decodes to fp32 in torch."""
    from lora_engine import autograd

    def refuse(*args, **kwargs):
        raise AssertionError("an ordinary backward took the differentiable route")

    monkeypatch.setattr(autograd, "_differentiable_backward", refuse)
    x, packed, state, lora_A, lora_B, _ = _operands(kernel_device, False)
    x.requires_grad_()
    with lora_engine.use_backend("triton"):
        lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 1.5).sum().backward()
    assert x.grad is not None

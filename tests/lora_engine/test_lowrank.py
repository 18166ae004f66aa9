"""The base product plus a low-rank term whose left factor the caller computed (``lowrank_linear_4bit`` /
``lowrank_linear``), against the reference: output and the gradients of x, left, B and the bias, by the
three-way rule of ``lora_engine.testing.assert_close_3way`` (the kernel's error against float64 at most twice
torch's own in the same dtype, plus four ulps of the largest magnitude).

Composed with ``left = drop(x)·Aᵀ`` made by torch, it must give LoRA's gradients: the kernels send dy·W to x and
``s·dy·B`` to left, and autograd carries the latter on to A and x.
"""

import itertools
import random
import zlib
from dataclasses import dataclass

import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_engine
from lora_engine import dispatch, reference
from lora_engine.testing import assert_close_3way

pytestmark = pytest.mark.interpreter

# (N, K, blocksize): N and K are multiples of no tile size
SHAPES = {"straddle": (37, 100, 64), "odd_k": (45, 75, 32), "aligned": (70, 96, 32)}


@dataclass(frozen=True)
class Case:
    m: int
    quant_type: str
    nested: bool
    dtype: torch.dtype
    rank: int
    bias: bool
    path: str
    shape: str

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        nest = "nested" if self.nested else "plain"
        return f"M{self.m}-{self.quant_type}-{nest}-{dt}-r{self.rank}-{'bias' if self.bias else 'nobias'}-" + (
            f"{self.path}-{self.shape}"
        )


def _cases():
    """Every (M, quant type, nesting, dtype) combination, each paired with a different mix of the rest."""
    primary = list(itertools.product([1, 33, 70], ["nf4", "fp4"], [False, True], [torch.float16, torch.float32]))
    secondary = list(itertools.product([1, 8, 16], [False, True], dispatch.PATHS, SHAPES))
    random.Random(2).shuffle(secondary)
    return [Case(*p, *s) for p, s in zip(primary, secondary)]


CASES = _cases()


def _inputs(case: Case, device: str):
    n, k, blocksize = SHAPES[case.shape]
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    dense = randn(n, k, std=0.5).to(case.dtype)
    packed, state = bnbF.quantize_4bit(dense, blocksize=blocksize, quant_type=case.quant_type,
                                       compress_statistics=case.nested)  # fmt: skip
    if case.m == 33:  # leading dims and non-contiguous views of x and left; B transposed, as lora_B(I)ᵀ gives it
        x = randn(3, 11, k + 5)[..., 2 : k + 2].to(case.dtype)
        left = randn(3, 11, case.rank + 3, std=2.0)[..., 1 : case.rank + 1].to(case.dtype)
        lora_B = randn(case.rank, n, std=0.3).to(case.dtype).t()
    else:
        x = randn(case.m, k).to(case.dtype)
        left = randn(case.m, case.rank, std=2.0).to(case.dtype)
        lora_B = randn(n, case.rank, std=0.3).to(case.dtype)
    bias = randn(n).to(case.dtype) if case.bias else None
    return dict(packed=packed, state=state, x=x, left=left, lora_B=lora_B, bias=bias,
                dy=randn(*x.shape[:-1], n).to(case.dtype))  # fmt: skip


def _torch_lowrank(x, weight, left, lora_B, bias, scaling):
    y = x @ weight.t() + scaling * (left @ lora_B.t())
    return y + bias if bias is not None else y


NAMES = ("x", "left", "lora_B", "bias")


def _check_case(case: Case, device: str, dense: bool = False):
    scaling = 1.7
    t = _inputs(case, device)
    w32 = reference.dequantize_4bit(t["packed"], t["state"], torch.float32)

    def leaves(dtype):
        return [t[name].detach().to(dtype).requires_grad_() if t[name] is not None else None for name in NAMES]

    x, left, lora_B, bias = leaves(case.dtype)
    with lora_engine.use_backend("triton"), lora_engine.force_path(None if dense else case.path):
        if dense:
            y = lora_engine.lowrank_linear(x, w32.to(case.dtype), left, lora_B, scaling, bias=bias)
        else:
            y = lora_engine.lowrank_linear_4bit(x, t["packed"], t["state"], left, lora_B, scaling, bias=bias)
    y.backward(t["dy"])
    got = [y] + [leaf.grad for leaf in (x, left, lora_B, bias) if leaf is not None]

    results = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        xr, lr, br, biasr = leaves(dtype)
        yr = _torch_lowrank(xr, w32.to(dtype), lr, br, biasr, scaling)
        yr.backward(t["dy"].to(dtype))
        results[label] = [yr] + [leaf.grad for leaf in (xr, lr, br, biasr) if leaf is not None]

    assert y.dtype == case.dtype and y.shape == t["x"].shape[:-1] + (t["lora_B"].shape[0],)
    assert t["packed"].grad is None, "the frozen 4-bit weight must get no gradient"
    names = ["y", "dx", "dleft", "dB", "dbias"][: len(got)]
    for name, mine, precise, same in zip(names, got, results["precise"], results["same"]):
        assert mine.dtype == case.dtype, f"{name} dtype {mine.dtype}"
        assert precise.abs().max() > 0, f"{name}: degenerate case, the reference is all zero"
        assert_close_3way(f"{case.id} {name}", mine, precise, same)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, kernel_device):
    _check_case(case, kernel_device)


@pytest.mark.parametrize("case", [Case(33, "nf4", True, torch.float32, 8, True, "dense", "odd_k"),
                                  Case(5, "fp4", False, torch.float16, 16, False, "dense", "straddle")],
                         ids=lambda c: c.id)  # fmt: skip
def test_dense_matches_reference(case, kernel_device):
    _check_case(case, kernel_device, dense=True)


@pytest.mark.parametrize("path", ["fused", "dequant", "gemv"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_left_made_by_torch_gives_loras_gradients(path, dropout, kernel_device):
    """left = drop(x)·Aᵀ through a torch nn.Linear and dropout (as a LoRA module sharded by FSDP makes it): y and
    the gradients of x, A and B are LoRA's, within fp32 rounding of K-long sums (1e-5 of the largest value)."""
    n, k, r = 37, 96, 8
    gen = torch.Generator().manual_seed(3)
    packed, state = bnbF.quantize_4bit(torch.randn(n, k, generator=gen).to(kernel_device), blocksize=32)
    x0 = torch.randn(2, 3, k, generator=gen).to(kernel_device)
    A0, B0 = torch.randn(r, k, generator=gen) * 0.3, torch.randn(n, r, generator=gen) * 0.3
    dy = torch.randn(2, 3, n, generator=gen).to(kernel_device)
    mask = (torch.rand(2, 3, k, generator=gen) >= dropout).to(kernel_device) / (1 - dropout)

    def run(compose: bool):
        x = x0.clone().requires_grad_()
        lora_A, lora_B = A0.to(kernel_device).requires_grad_(), B0.to(kernel_device).requires_grad_()
        with lora_engine.use_backend("triton"), lora_engine.force_path(path):
            if compose:
                left = torch.nn.functional.linear(x * mask, lora_A)
                y = lora_engine.lowrank_linear_4bit(x, packed, state, left, lora_B, 2.0)
            else:  # the same dropped input, given to LoRA's kernels as a second input: y = x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ
                base = lora_engine.linear_4bit(x, packed, state)
                y = base + 2.0 * torch.nn.functional.linear(torch.nn.functional.linear(x * mask, lora_A), lora_B)
        y.backward(dy)
        return y.detach(), x.grad, lora_A.grad, lora_B.grad

    for name, got, want in zip(("y", "dx", "dA", "dB"), run(True), run(False)):
        worst, bound = (got - want).abs().max().item(), 1e-5 * want.abs().max().item()
        assert want.abs().max() > 0 and worst <= bound, f"{name}: max |difference| {worst:.3g} > {bound:.3g}"


def test_second_order_gradients_match_torch_autograd(kernel_device):
    """create_graph=True: the gradients recomputed with torch operations equal the reference's (1e-4 relative)."""
    gen = torch.Generator().manual_seed(4)
    packed, state = bnbF.quantize_4bit(torch.randn(37, 96, generator=gen).to(kernel_device), blocksize=64)
    operands = [torch.randn(6, 96, generator=gen), torch.randn(6, 8, generator=gen),
                torch.randn(37, 8, generator=gen) * 0.3, torch.randn(37, generator=gen)]  # fmt: skip

    def penalised(backend):
        x, left, lora_B, bias = (t.to(kernel_device).requires_grad_() for t in operands)
        with lora_engine.use_backend(backend):
            y = lora_engine.lowrank_linear_4bit(x, packed, state, left, lora_B, 1.5, bias=bias)
            loss = (y.sin() * torch.linspace(-1, 1, y.shape[1], device=y.device)).sum()
            d_x, d_left = torch.autograd.grad(loss, [x, left], create_graph=True)
            (loss + d_x.square().sum() + d_left.square().sum()).backward()
        return x.grad, left.grad, lora_B.grad, bias.grad

    for name, got, want in zip(NAMES, penalised("triton"), penalised("torch")):
        worst, bound = (got - want).abs().max().item(), 1e-4 * want.abs().max().item()
        assert want.abs().max() > 0 and worst <= bound, f"d{name}: max |difference| {worst:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(left=torch.zeros(5, 3, 4)), r"left must have x's leading shape and r=4 columns"),
        (dict(left=torch.zeros(5, 3, 5)), r"left must have x's leading shape and r=4 columns"),
        (dict(lora_B=torch.zeros(36, 4)), r"lora_B must be \(out_features, r\) = \(37, r >= 1\)"),
        (dict(lora_B=torch.zeros(37, 0)), r"lora_B must be \(out_features, r\) = \(37, r >= 1\)"),
        (dict(left=torch.zeros(2, 5, 4, dtype=torch.int32)), r"left must be floating point"),
        (dict(scaling=float("nan")), r"scaling must be a finite Python number"),
        (dict(bias=torch.zeros(36)), r"bias must be \(out_features,\) = \(37,\)"),
    ],
    ids=["leading-shape", "rank", "B-rows", "B-rank", "left-dtype", "scaling", "bias"],
)
def test_bad_operands_are_named(backend, change, message):
    packed, state = bnbF.quantize_4bit(torch.randn(37, 64), blocksize=64)
    args = dict(x=torch.zeros(2, 5, 64), left=torch.zeros(2, 5, 4), lora_B=torch.zeros(37, 4), scaling=1.0, bias=None)
    args.update(change)
    with lora_engine.use_backend(backend), pytest.raises((ValueError, TypeError), match=message):
        lora_engine.lowrank_linear_4bit(args["x"], packed, state, args["left"], args["lora_B"], args["scaling"],
                                        bias=args["bias"])  # fmt: skip

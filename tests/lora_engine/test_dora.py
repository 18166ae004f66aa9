"""DoRA through the kernels against the reference: output and the gradients of x, A, B and the magnitude, by the
three-way rule.

    y = g ⊙ (x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ) + bias,   g = m / ‖deq(W) + s·B·A‖ (row norms, not differentiated)

The kernels get the norm from ‖W‖², one 4-bit GEMM of A and rank-r products; the torch copies below compute it
from the dense W + s·B·A, so a wrong norm term shows. A handful of cases per path: the interpreter is slow.
"""

import zlib
from dataclasses import dataclass

import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_engine
from lora_engine import reference
from lora_engine.testing import assert_close_3way

pytestmark = pytest.mark.interpreter

SHAPES = {"straddle": (37, 100, 64), "odd_k": (45, 75, 32), "aligned": (70, 96, 32)}  # (N, K, blocksize)
F16, F32 = torch.float16, torch.float32


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
        bias = "bias" if self.bias else "nobias"
        return f"M{self.m}-{self.quant_type}-{nest}-{dt}-r{self.rank}-{bias}-{self.path}-{self.shape}"


CASES = [
    Case(1, "nf4", True, F32, 8, True, "fused", "straddle"),
    Case(7, "fp4", False, F16, 5, False, "fused", "odd_k"),
    Case(33, "nf4", False, F32, 16, True, "dequant", "straddle"),
    Case(7, "fp4", True, F16, 8, True, "dequant", "aligned"),
    Case(33, "fp4", True, F16, 4, True, "dequant_cublas", "odd_k"),
    Case(1, "nf4", False, F32, 8, True, "gemv", "aligned"),
]


def _inputs(case: Case, device: str) -> dict:
    n, k, blocksize = SHAPES[case.shape]
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    dense = randn(n, k, std=0.5)
    packed, state = bnbF.quantize_4bit(dense, blocksize=blocksize, quant_type=case.quant_type,
                                       compress_statistics=case.nested)  # fmt: skip
    x = randn(3, 11, k) if case.m == 33 else randn(case.m, k)
    return dict(
        packed=packed,
        state=state,
        x=x.to(case.dtype),
        lora_A=randn(case.rank, k, std=0.3).to(case.dtype),
        lora_B=randn(n, case.rank, std=0.3).to(case.dtype),
        magnitude=(5.0 + randn(n)).to(case.dtype),
        bias=randn(n).to(case.dtype) if case.bias else None,
        dy=randn(*x.shape[:-1], n).to(case.dtype),
    )


def _torch_dora(x, weight, lora_A, lora_B, magnitude, bias, scaling):
    norm = torch.linalg.norm(weight + scaling * (lora_B @ lora_A).detach(), dim=1).detach()
    y = (x @ weight.t() + scaling * ((x @ lora_A.t()) @ lora_B.t())) * (magnitude / norm)
    return y + bias if bias is not None else y


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dora_matches_reference(case, kernel_device):
    scaling = 1.7
    t = _inputs(case, kernel_device)
    w32 = reference.dequantize_4bit(t["packed"], t["state"], torch.float32)
    names = ("x", "lora_A", "lora_B", "magnitude") + (("bias",) if case.bias else ())

    def leaves(dtype):
        return {name: t[name].detach().to(dtype).requires_grad_() for name in names}

    got = leaves(case.dtype)
    with lora_engine.use_backend("triton"), lora_engine.force_path(case.path):
        y = lora_engine.dora_linear_4bit(
            got["x"], t["packed"], t["state"], got["lora_A"], got["lora_B"], got["magnitude"], scaling,
            bias=got.get("bias"),
        )  # fmt: skip
    y.backward(t["dy"])
    expected = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        r = leaves(dtype)
        yr = _torch_dora(r["x"], w32.to(dtype), r["lora_A"], r["lora_B"], r["magnitude"], r.get("bias"), scaling)
        yr.backward(t["dy"].to(dtype))
        expected[label] = {"y": yr, **{f"d{name}": r[name].grad for name in names}}
    actual = {"y": y, **{f"d{name}": got[name].grad for name in names}}
    assert t["packed"].grad is None
    for name, value in actual.items():
        assert value is not None and value.dtype == case.dtype, f"{name}: {value}"
        precise, same = expected["precise"][name], expected["same"][name]
        assert precise.abs().max() > 0, f"{name}: degenerate case"
        assert_close_3way(f"{case.id} {name}", value, precise, same)


def test_reference_is_peft_dora():
    """The reference is PEFT's DoRA layer (no dropout): base(x) + (g - 1)·x·Wᵀ + g·s·B·A·x with g = m / ‖W + sBA‖."""
    from peft.tuners.lora.dora import DoraLinearLayer

    torch.manual_seed(0)
    n, k, r, s = 37, 64, 4, 0.5
    packed, state = bnbF.quantize_4bit(torch.randn(n, k), blocksize=64, quant_type="nf4")
    w = reference.dequantize_4bit(packed, state)
    base = torch.nn.Linear(k, n)
    with torch.no_grad():
        base.weight.copy_(w)
    lora_A, lora_B = torch.nn.Linear(k, r, bias=False), torch.nn.Linear(r, n, bias=False)
    torch.nn.init.normal_(lora_B.weight, std=0.3)
    dora = DoraLinearLayer(fan_in_fan_out=False)
    dora.update_layer(base_layer=base, lora_A=lora_A.weight, lora_B=lora_B.weight, scaling=s)
    with torch.no_grad():
        dora.weight.mul_(1 + 0.1 * torch.randn(n))
    x = torch.randn(5, k)
    expected = base(x) + dora(x, lora_A=lora_A, lora_B=lora_B, scaling=s, base_layer=base, base_result=base(x))
    got = reference.dora_linear_4bit(x, packed, state, lora_A.weight, lora_B.weight, dora.weight, s, base.bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_magnitude_raises(backend, kernel_device):
    t = _inputs(CASES[0], kernel_device)
    args = (t["x"], t["packed"], t["state"], t["lora_A"], t["lora_B"])
    with lora_engine.use_backend(backend):
        with pytest.raises(ValueError, match=r"magnitude must be \(out_features,\) = \(37,\)"):
            lora_engine.dora_linear_4bit(*args, torch.ones(36, device=kernel_device), 1.0)
        with pytest.raises(TypeError, match="magnitude must be floating point"):
            lora_engine.dora_linear_4bit(*args, torch.ones(37, dtype=torch.int64, device=kernel_device), 1.0)
        with pytest.raises(ValueError, match=r"lora_B must be \(out_features, r\)"):
            lora_engine.dora_linear_4bit(*args[:4], t["lora_B"][:-1], t["magnitude"], 1.0)


def test_double_backward_matches_reference(kernel_device):
    """create_graph=True runs the gradients as torch operations: second-order terms through A, B and m are exact."""
    t = _inputs(CASES[2], kernel_device)
    results = []
    for backend in ("triton", "torch"):
        x, lora_A, lora_B, magnitude = (t[n].detach().clone().requires_grad_() for n in ("x", "lora_A", "lora_B",
                                                                                          "magnitude"))  # fmt: skip
        with lora_engine.use_backend(backend):
            y = lora_engine.dora_linear_4bit(x, t["packed"], t["state"], lora_A, lora_B, magnitude, 1.7, t["bias"])
        (dx,) = torch.autograd.grad(y, x, t["dy"], create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), (lora_A, lora_B, magnitude)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

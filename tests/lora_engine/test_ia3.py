"""IA3 through the kernels against the reference: output and the gradients of x, l and bias, by the three-way rule.

    scales_input   y = (x ⊙ l)·deq(W)ᵀ + bias       (the scale in the GEMM's prologue)
    otherwise      y = (x·deq(W)ᵀ + bias) ⊙ l       (the scale in the epilogue)

Each case builds three copies of the inputs (the kernel path, torch in the same dtype, float64); the kernel may
err at most twice as much as torch does (``lora_engine.testing.assert_close_3way``). A handful of cases per
kernel flag and path, not a full product: the interpreter is slow.
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

SHAPES = {  # (N, K, blocksize): N and K are multiples of no tile size
    "straddle": (37, 100, 64),  # K % blocksize != 0: blocks straddle rows
    "odd_k": (45, 75, 32),  # K odd: rows start mid-byte
    "aligned": (70, 96, 32),  # blocksize divides K (the GEMV serves it)
}


@dataclass(frozen=True)
class Case:
    m: int
    quant_type: str
    nested: bool
    dtype: torch.dtype
    scales_input: bool
    bias: bool
    path: str
    shape: str

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        side = "in" if self.scales_input else "out"
        nest = "nested" if self.nested else "plain"
        bias = "bias" if self.bias else "nobias"
        return f"M{self.m}-{self.quant_type}-{nest}-{dt}-{side}-{bias}-{self.path}-{self.shape}"


F16, F32 = torch.float16, torch.float32
CASES = [
    Case(1, "nf4", True, F32, True, True, "fused", "straddle"),
    Case(7, "fp4", False, F16, True, False, "fused", "odd_k"),
    Case(33, "nf4", False, F16, False, True, "fused", "straddle"),
    Case(7, "fp4", True, F32, False, True, "fused", "odd_k"),
    Case(33, "fp4", True, F32, True, True, "dequant", "aligned"),
    Case(1, "nf4", False, F16, False, False, "dequant", "straddle"),
    Case(7, "nf4", True, F16, True, True, "dequant_cublas", "odd_k"),
    Case(33, "fp4", False, F32, False, True, "dequant_cublas", "aligned"),
    Case(1, "fp4", True, F16, True, True, "gemv", "aligned"),
    Case(7, "nf4", False, F32, False, True, "gemv", "aligned"),
]


def _inputs(case: Case, device: str) -> dict:
    n, k, blocksize = SHAPES[case.shape]
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    dense = randn(n, k, std=0.5).to(case.dtype)
    packed, state = bnbF.quantize_4bit(
        dense, blocksize=blocksize, quant_type=case.quant_type, compress_statistics=case.nested
    )
    x = randn(3, 11, k) if case.m == 33 else randn(case.m, k)  # leading dims at M = 33
    return dict(
        packed=packed,
        state=state,
        x=x.to(case.dtype),
        l=(1.0 + 0.3 * randn(k if case.scales_input else n)).to(case.dtype),
        bias=randn(n).to(case.dtype) if case.bias else None,
        dy=randn(*x.shape[:-1], n).to(case.dtype),
    )


def _torch_ia3(x, weight, scale, bias, scales_input):
    if scales_input:
        y = (x * scale) @ weight.t()
        return y + bias if bias is not None else y
    y = x @ weight.t()
    return (y + bias if bias is not None else y) * scale


def _check(case: Case, device: str, functional=None) -> None:
    t = _inputs(case, device)
    w32 = reference.dequantize_4bit(t["packed"], t["state"], torch.float32)
    names = ("x", "l", "bias") if case.bias else ("x", "l")

    def leaves(dtype):
        return {name: t[name].detach().to(dtype).requires_grad_() for name in names}

    got = leaves(case.dtype)
    with lora_engine.use_backend("triton"), lora_engine.force_path(case.path if case.path != "dense" else None):
        if functional is None:
            y = lora_engine.ia3_linear_4bit(
                got["x"], t["packed"], t["state"], got["l"], case.scales_input, bias=got.get("bias")
            )
        else:
            y = functional(got["x"], w32.to(case.dtype), got["l"], case.scales_input, bias=got.get("bias"))
    y.backward(t["dy"])
    expected = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        ref = leaves(dtype)
        yr = _torch_ia3(ref["x"], w32.to(dtype), ref["l"], ref.get("bias"), case.scales_input)
        yr.backward(t["dy"].to(dtype))
        expected[label] = {"y": yr, **{f"d{name}": ref[name].grad for name in names}}

    assert y.dtype == case.dtype and y.shape == t["x"].shape[:-1] + (w32.shape[0],)
    assert t["packed"].grad is None, "the frozen 4-bit weight must get no gradient"
    actual = {"y": y, **{f"d{name}": got[name].grad for name in names}}
    for name, value in actual.items():
        assert value is not None and value.dtype == case.dtype, f"{name}: {value}"
        precise, same = expected["precise"][name], expected["same"][name]
        assert precise.abs().max() > 0, f"{name}: degenerate case"
        assert_close_3way(f"{case.id} {name}", value, precise, same)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ia3_4bit_matches_reference(case, kernel_device):
    _check(case, kernel_device)


@pytest.mark.parametrize("scales_input", [True, False], ids=["in", "out"])
def test_ia3_dense_matches_reference(scales_input, kernel_device):
    case = Case(7, "nf4", False, F16, scales_input, True, "dense", "odd_k")
    _check(case, kernel_device, functional=lora_engine.ia3_linear)


@pytest.mark.parametrize("scales_input", [True, False], ids=["in", "out"])
def test_reference_is_peft_ia3(scales_input):
    """The reference is PEFT's formula: the output scale multiplies the bias too, the input scale does not."""
    gen = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(5, 12, generator=gen), torch.randn(9, 12, generator=gen), torch.randn(9, generator=gen)
    scale = torch.randn(12 if scales_input else 9, generator=gen)
    y = reference.ia3_linear(x, w, scale, scales_input, bias)
    base = torch.nn.functional.linear
    expected = base(x * scale, w, bias) if scales_input else base(x, w, bias) * scale
    torch.testing.assert_close(y, expected)


def test_kernel_flags_change_the_result(kernel_device):
    """The tolerance can fail: scaling the wrong side, or not at all, is far outside it."""
    case = CASES[2]
    t = _inputs(case, kernel_device)
    w32 = reference.dequantize_4bit(t["packed"], t["state"], torch.float32)
    with lora_engine.use_backend("triton"):
        y = lora_engine.ia3_linear_4bit(t["x"], t["packed"], t["state"], t["l"], False, bias=t["bias"])
    x, bias = t["x"].double(), t["bias"].double()
    unscaled = x @ w32.double().t() + bias
    assert (y.double() - unscaled).abs().max() > 0.1
    assert (y.double() - (x @ w32.double().t() * t["l"].double() + bias)).abs().max() > 0.1  # bias unscaled


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_ia3_operands_raise(backend, kernel_device):
    case = CASES[0]
    t = _inputs(case, kernel_device)
    n, k, _ = SHAPES[case.shape]
    args = (t["x"], t["packed"], t["state"])
    with lora_engine.use_backend(backend):
        with pytest.raises(ValueError, match=r"ia3_l must be a vector \(in_features,\) = \(100,\)"):
            lora_engine.ia3_linear_4bit(*args, torch.ones(n), True)
        with pytest.raises(ValueError, match=r"ia3_l must be a vector \(out_features,\) = \(37,\)"):
            lora_engine.ia3_linear_4bit(*args, torch.ones(1, n), False)
        with pytest.raises(TypeError, match="ia3_l must be floating point"):
            lora_engine.ia3_linear_4bit(*args, torch.ones(k, dtype=torch.int64), True)
        with pytest.raises(TypeError, match="scales_input must be a bool"):
            lora_engine.ia3_linear_4bit(*args, torch.ones(k), 1)
        with pytest.raises(ValueError, match=r"bias must be \(out_features,\)"):
            lora_engine.ia3_linear_4bit(*args, torch.ones(k), True, bias=torch.ones(k))
        with pytest.raises(ValueError, match="x's last dimension must be in_features=100"):
            lora_engine.ia3_linear_4bit(t["x"][:, :-1], t["packed"], t["state"], torch.ones(k), True)


def test_double_backward_matches_reference(kernel_device):
    """create_graph=True runs the gradients as torch operations: second-order terms of l are exact."""
    case = CASES[3]
    t = _inputs(case, kernel_device)
    results = []
    for backend in ("triton", "torch"):
        x = t["x"].detach().clone().requires_grad_()
        scale = t["l"].detach().clone().requires_grad_()
        with lora_engine.use_backend(backend):
            y = lora_engine.ia3_linear_4bit(x, t["packed"], t["state"], scale, False, bias=t["bias"])
        (dx,) = torch.autograd.grad(y, x, t["dy"], create_graph=True)
        (dl,) = torch.autograd.grad(dx.square().sum(), scale)
        results.append(dl)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def test_launchers_refuse_bad_scales():
    """The kernels' launchers name a wrong scale vector before launching anything."""
    from lora_engine.kernels.lora_matmul import lora_matmul

    a, w = torch.randn(3, 10), torch.randn(6, 10)
    with pytest.raises(ValueError, match=r"in_scale must be a contiguous \[10\] vector"):
        lora_matmul(a, w, weight_out_by_in=True, in_scale=torch.ones(6))
    with pytest.raises(ValueError, match=r"out_scale must be a contiguous \[6\] vector"):
        lora_matmul(a, w, weight_out_by_in=True, out_scale=torch.ones(12)[::2])
    with pytest.raises(ValueError, match="not both"):
        lora_matmul(a, w, weight_out_by_in=True, in_scale=torch.ones(10), out_scale=torch.ones(6))
    with pytest.raises(ValueError, match="input scale does not combine with a LoRA term"):
        lora_matmul(a, w, weight_out_by_in=True, right=torch.ones(6, 2), left=torch.ones(3, 2), in_scale=torch.ones(10))

"""Fused kernels against the reference: output and the gradients of x, A and B, by the three-way rule.

Each case builds three copies of the inputs: the Triton path, plain torch in the same dtype, and float64.
The kernel's error against float64 may be at most twice torch's own, plus four ulps of the output's largest
magnitude (the rule of ``lora_engine.testing.assert_close_3way``). Dropout cases use the same seed
everywhere: the float64 and same-dtype copies apply the reference mask, so a kernel that drops other elements
fails.
"""

import itertools
import random
import zlib
from dataclasses import dataclass

import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_engine
import lora_engine.autograd
from lora_engine import dispatch, reference
from lora_engine.testing import assert_close_3way

pytestmark = pytest.mark.interpreter

# (N, K, blocksize): N and K are multiples of no tile size.
SHAPES = {
    "straddle": (37, 100, 64),  # K % blocksize != 0: blocks straddle rows; K even: paired nibble decode
    "odd_k": (45, 75, 32),  # K odd: every other row starts in the middle of a byte
    "aligned": (70, 96, 32),  # blocksize divides K: one scale per row per K step
    "wide_blocks": (37, 256, 128),  # blocksize divides K and exceeds the K step of some kernels
}
# Fewer output features than the narrowest output tile of any config: one column of output tiles, whose programs
# alone store the left factor (x·Aᵀ) that dB reads.
NARROW = {"narrow": (12, 96, 32)}


@dataclass(frozen=True)
class Case:
    m: int
    quant_type: str
    nested: bool
    dtype: torch.dtype
    rank: int
    bias: bool
    dropout: float
    path: str
    shape: str

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        nest = "nested" if self.nested else "plain"
        bias = "bias" if self.bias else "nobias"
        return f"M{self.m}-{self.quant_type}-{nest}-{dt}-r{self.rank}-{bias}-p{self.dropout}-{self.path}-{self.shape}"


def _cases(dtypes):
    """Every (M, quant type, nesting, dtype) combination, each paired with a different mix of the rest."""
    primary = list(itertools.product([1, 7, 33, 300], ["nf4", "fp4"], [False, True], dtypes))
    secondary = list(itertools.product([1, 8, 16, 64], [False, True], [0.0, 0.1], dispatch.PATHS, SHAPES))
    random.Random(0).shuffle(secondary)
    return [Case(*p, *s) for p, s in zip(primary + primary[::3], secondary)]


CASES = _cases([torch.float16, torch.float32])
GPU_CASES = _cases([torch.bfloat16])


def _gemv_cases(dtypes):
    """The gemv path over the token counts it serves (its backward takes the dequant route); "straddle" checks
    that a weight it cannot read row by row falls back to the dequant path with the same results."""
    primary = list(itertools.product([1, 2, 7, 16], ["nf4", "fp4"], [False, True], dtypes))
    shapes = ["aligned", "wide_blocks", "straddle"]
    secondary = list(itertools.product([1, 8, 16, 64], [False, True], [0.0, 0.1], ["gemv"], shapes))
    random.Random(1).shuffle(secondary)
    return [Case(*p, *s) for p, s in zip(primary, secondary)]


GEMV_CASES = _gemv_cases([torch.float16, torch.float32])
GPU_GEMV_CASES = _gemv_cases([torch.bfloat16])


def _inputs(case: Case, device: str):
    n, k, blocksize = {**SHAPES, **NARROW}[case.shape]
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    dense = randn(n, k, std=0.5).to(case.dtype)
    packed, state = bnbF.quantize_4bit(dense, blocksize=blocksize, quant_type=case.quant_type, compress_statistics=case.nested)
    if case.m == 33:  # leading dims and a non-contiguous view
        x = randn(3, 11, k + 5)[..., 2 : k + 2].to(case.dtype)
    else:
        x = randn(case.m, k).to(case.dtype)
    return dict(
        packed=packed,
        state=state,
        x=x,
        lora_A=randn(case.rank, k, std=0.3).to(case.dtype),
        lora_B=randn(n, case.rank, std=0.3).to(case.dtype),
        bias=randn(n).to(case.dtype) if case.bias else None,
        dy=randn(*x.shape[:-1], n).to(case.dtype),
    )


def _torch_lora(x, weight, lora_A, lora_B, bias, keep, p, scaling):
    x_lora = x if keep is None else x * keep.to(x.dtype) * (1.0 / (1.0 - p))
    y = x @ weight.t() + scaling * ((x_lora @ lora_A.t()) @ lora_B.t())
    return y + bias if bias is not None else y


def _check_case(case: Case, device: str):
    scaling = 1.7
    t = _inputs(case, device)
    k = t["x"].shape[-1]
    m = t["x"].numel() // k
    seed = 1000 + case.m
    keep = reference.dropout_keep_mask(seed, m, k, case.dropout, device).reshape(t["x"].shape) if case.dropout else None
    w32 = reference.dequantize_4bit(t["packed"], t["state"], torch.float32)

    def leaves(dtype):
        return [t[name].detach().to(dtype).requires_grad_() for name in ("x", "lora_A", "lora_B")]

    x, lora_A, lora_B = leaves(case.dtype)
    with lora_engine.use_backend("triton"), lora_engine.force_path(case.path):
        y = lora_engine.lora_linear_4bit(
            x, t["packed"], t["state"], lora_A, lora_B, scaling, bias=t["bias"], dropout_p=case.dropout,
            training=True, dropout_seed=seed,
        )  # fmt: skip
    y.backward(t["dy"])

    results = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        xr, ar, br = leaves(dtype)
        bias = t["bias"].to(dtype) if t["bias"] is not None else None
        yr = _torch_lora(xr, w32.to(dtype), ar, br, bias, keep, case.dropout, scaling)
        yr.backward(t["dy"].to(dtype))
        results[label] = (yr, xr.grad, ar.grad, br.grad)

    assert y.dtype == case.dtype and y.shape == t["x"].shape[:-1] + (lora_B.shape[0],)
    assert t["packed"].grad is None, "the frozen 4-bit weight must get no gradient"
    for i, (name, got) in enumerate((("y", y), ("dx", x.grad), ("dA", lora_A.grad), ("dB", lora_B.grad))):
        assert got.dtype == case.dtype, f"{name} dtype {got.dtype}"
        precise, same = results["precise"][i], results["same"][i]
        assert precise.abs().max() > 0, f"{name}: degenerate case, the reference is all zero"
        assert_close_3way(f"{case.id} {name}", got, precise, same)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, kernel_device):
    _check_case(case, kernel_device)


@pytest.mark.parametrize(
    "case",
    [Case(40, "nf4", True, torch.float32, 8, True, 0.0, path, "narrow") for path in ("fused", "dequant")]
    + [Case(40, "fp4", False, torch.float16, 16, False, 0.0, "fused", "narrow")],
    ids=lambda c: c.id,
)
def test_output_narrower_than_one_tile(case, kernel_device):
    """Enough rows for the left factor to be accumulated inside the GEMM (no split K) and no dropout: the one
    column of output tiles must store it, or dB reads an unwritten buffer."""
    _check_case(case, kernel_device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_matches_reference_bf16(case, kernel_device):
    _check_case(case, kernel_device)


def _check_gemv_case(case: Case, device: str, monkeypatch) -> None:
    launches = []
    gemv = lora_engine.autograd.lora_gemv_4bit
    monkeypatch.setattr(lora_engine.autograd, "lora_gemv_4bit", lambda *a, **kw: launches.append(1) or gemv(*a, **kw))
    _check_case(case, device)
    expected = 0 if case.shape == "straddle" else 1
    assert len(launches) == expected, f"the gemv kernel ran {len(launches)} times, expected {expected}"


@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: c.id)
def test_gemv_path_matches_reference(case, kernel_device, monkeypatch):
    _check_gemv_case(case, kernel_device, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_GEMV_CASES, ids=lambda c: c.id)
def test_gemv_path_matches_reference_bf16(case, kernel_device, monkeypatch):
    _check_gemv_case(case, kernel_device, monkeypatch)


def test_reference_backend_matches_precise():
    """The torch reference itself agrees with float64 (it is what the CPU fallback runs)."""
    case = Case(33, "nf4", True, torch.float32, 8, True, 0.1, "fused", "straddle")
    t = _inputs(case, "cpu")
    y = reference.lora_linear_4bit(
        t["x"], t["packed"], t["state"], t["lora_A"], t["lora_B"], 1.7, t["bias"], 0.1, True, dropout_seed=5
    )
    keep = reference.dropout_keep_mask(5, 33, 100, 0.1).reshape(t["x"].shape)
    w = reference.dequantize_4bit(t["packed"], t["state"])
    d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    precise = _torch_lora(d["x"], w.double(), d["lora_A"], d["lora_B"], d["bias"], keep, 0.1, 1.7)
    same = _torch_lora(t["x"], w, t["lora_A"], t["lora_B"], t["bias"], keep, 0.1, 1.7)
    assert_close_3way("reference y", y, precise, same)


def test_fp32_lora_weights_with_half_activations(kernel_device):
    """PEFT keeps adapters in fp32 while activations are fp16: gradients come back in fp32, as accurate as
    plain fp16 torch."""
    case = Case(7, "nf4", True, torch.float16, 16, False, 0.0, "fused", "straddle")
    t = _inputs(case, kernel_device)
    lora_A = t["lora_A"].float().requires_grad_()
    lora_B = t["lora_B"].float().requires_grad_()
    with lora_engine.use_backend("triton"):
        y = lora_engine.lora_linear_4bit(t["x"], t["packed"], t["state"], lora_A, lora_B, 2.0)
    y.backward(t["dy"])
    assert y.dtype == torch.float16 and lora_A.grad.dtype == torch.float32 and lora_B.grad.dtype == torch.float32
    w32 = reference.dequantize_4bit(t["packed"], t["state"])
    results = {}
    for label, dtype in (("precise", torch.float64), ("same", torch.float16)):
        xr, ar, br = (t[n].to(dtype).requires_grad_() for n in ("x", "lora_A", "lora_B"))
        yr = _torch_lora(xr, w32.to(dtype), ar, br, None, None, 0.0, 2.0)
        yr.backward(t["dy"].to(dtype))
        results[label] = (yr, ar.grad, br.grad)
    for i, (name, got) in enumerate((("y", y), ("dA", lora_A.grad), ("dB", lora_B.grad))):
        assert_close_3way(name, got, results["precise"][i], results["same"][i], atol=1e-3 * results["precise"][i].abs().max().item())

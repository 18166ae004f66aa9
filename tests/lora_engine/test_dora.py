"""DoRA through the kernels against the reference: output and the gradients of x, A, B and the magnitude, by the
three-way rule.

    y = g ⊙ (x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ) + bias,   g = m / ‖deq(W) + s·B·A‖ (row norms, not differentiated)
    with dropout in training (PEFT's rule), xd = drop(x):
    y = x·deq(W)ᵀ + bias + (g − 1) ⊙ (xd·deq(W)ᵀ) + g ⊙ s·(xd·Aᵀ)·Bᵀ

The kernels get the norm from ‖W‖², one GEMM of A over W and rank-r products; the torch copies below compute it
from the dense W + s·B·A, so a wrong norm term shows. They drop the elements of the reference's keep mask for the
same seed, which the kernels draw in-kernel. Path "dense" runs ``dora_linear`` over a dense W in the case's dtype, the
others ``dora_linear_4bit``. A handful of cases per path: the interpreter is slow.
"""

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Optional

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
    dropout: float = 0.0

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        nest = "nested" if self.nested else "plain"
        bias = "bias" if self.bias else "nobias"
        drop = f"-p{self.dropout}" if self.dropout else ""
        return f"M{self.m}-{self.quant_type}-{nest}-{dt}-r{self.rank}-{bias}-{self.path}-{self.shape}{drop}"


CASES = [
    Case(1, "nf4", True, F32, 8, True, "fused", "straddle"),
    Case(7, "fp4", False, F16, 5, False, "fused", "odd_k"),
    Case(33, "nf4", False, F32, 16, True, "dequant", "straddle"),
    Case(7, "fp4", True, F16, 8, True, "dequant", "aligned"),
    Case(33, "fp4", True, F16, 4, True, "dequant_cublas", "odd_k"),
    Case(1, "nf4", False, F32, 8, True, "gemv", "aligned"),
    Case(7, "dense", False, F16, 5, True, "dense", "odd_k"),
    Case(33, "dense", False, F32, 16, False, "dense", "straddle"),
]
# Dropout: M = 33 (above the 16 rows where x·Aᵀ leaves cuBLAS for the rank-r kernel), "gemv" and
# "dequant_cublas" (both take the dequant route), fused and dequant; p up to 0.3 so that M = 1 drops elements.
DROPOUT_CASES = [
    Case(1, "nf4", True, F32, 8, True, "fused", "straddle", 0.3),
    Case(7, "fp4", False, F16, 5, False, "fused", "odd_k", 0.1),
    Case(33, "nf4", False, F32, 16, True, "dequant", "straddle", 0.1),
    Case(33, "fp4", True, F16, 4, True, "dequant_cublas", "odd_k", 0.2),
    Case(1, "nf4", False, F16, 8, False, "gemv", "aligned", 0.3),
    Case(33, "dense", False, F32, 8, True, "dense", "odd_k", 0.2),
    Case(1, "dense", False, F16, 4, False, "dense", "aligned", 0.3),
]


def _inputs(case: Case, device: str) -> dict:
    n, k, blocksize = SHAPES[case.shape]
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    dense = randn(n, k, std=0.5)
    packed = state = None
    if case.path != "dense":
        packed, state = bnbF.quantize_4bit(dense, blocksize=blocksize, quant_type=case.quant_type,
                                           compress_statistics=case.nested)  # fmt: skip
    x = randn(3, 11, k) if case.m == 33 else randn(case.m, k)
    return dict(
        packed=packed,
        state=state,
        weight=dense.to(case.dtype),
        x=x.to(case.dtype),
        lora_A=randn(case.rank, k, std=0.3).to(case.dtype),
        lora_B=randn(n, case.rank, std=0.3).to(case.dtype),
        magnitude=(5.0 + randn(n)).to(case.dtype),
        bias=randn(n).to(case.dtype) if case.bias else None,
        dy=randn(*x.shape[:-1], n).to(case.dtype),
    )


def _torch_dora(x, weight, lora_A, lora_B, magnitude, bias, scaling, keep=None, p=0.0):
    """PEFT's DoRA in plain torch; with ``keep`` (bool, x's shape) its dropout route, written as PEFT computes it."""
    norm = torch.linalg.norm(weight + scaling * (lora_B @ lora_A).detach(), dim=1).detach()
    g = magnitude / norm
    if keep is None:
        y = (x @ weight.t() + scaling * ((x @ lora_A.t()) @ lora_B.t())) * g
    else:
        x_drop = x * keep.to(x.dtype) / (1 - p)
        y = x @ weight.t() + (g - 1) * (x_drop @ weight.t()) + g * ((x_drop @ lora_A.t()) @ lora_B.t()) * scaling
    return y + bias if bias is not None else y


def _dora(case: Case, t: dict, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The layer under test on the case's weight: ``dora_linear`` over the dense one, else ``dora_linear_4bit`` with
    the case's path forced."""
    if case.path == "dense":
        return lora_engine.dora_linear(x, t["weight"], *args, **kwargs)
    with lora_engine.force_path(case.path):
        return lora_engine.dora_linear_4bit(x, t["packed"], t["state"], *args, **kwargs)


def _dense_weight(case: Case, t: dict) -> torch.Tensor:
    """The case's W in fp32: the dense weight as the layer reads it, or the decode of the 4-bit one."""
    if case.path == "dense":
        return t["weight"].float()
    return reference.dequantize_4bit(t["packed"], t["state"], torch.float32)


def _check_case(case: Case, device: str, dropout_p: Optional[float] = None):
    """The kernels (called with ``dropout_p``, default the case's) against the torch copies with the case's mask."""
    scaling = 1.7
    t = _inputs(case, device)
    k = t["x"].shape[-1]
    seed = 1000 + case.m
    keep = None
    if case.dropout:
        keep = reference.dropout_keep_mask(seed, t["x"].numel() // k, k, case.dropout, device).reshape(t["x"].shape)
        assert keep.any() and not keep.all(), "degenerate mask: the test could not tell dropout from none"
    w32 = _dense_weight(case, t)
    names = ("x", "lora_A", "lora_B", "magnitude") + (("bias",) if case.bias else ())

    def leaves(dtype):
        return {name: t[name].detach().to(dtype).requires_grad_() for name in names}

    got = leaves(case.dtype)
    with lora_engine.use_backend("triton"):
        y = _dora(
            case, t, got["x"], got["lora_A"], got["lora_B"], got["magnitude"], scaling, bias=got.get("bias"),
            dropout_p=case.dropout if dropout_p is None else dropout_p, training=True, dropout_seed=seed,
        )  # fmt: skip
    y.backward(t["dy"])
    expected = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        r = leaves(dtype)
        yr = _torch_dora(r["x"], w32.to(dtype), r["lora_A"], r["lora_B"], r["magnitude"], r.get("bias"), scaling,
                         keep, case.dropout)  # fmt: skip
        yr.backward(t["dy"].to(dtype))
        expected[label] = {"y": yr, **{f"d{name}": r[name].grad for name in names}}
    actual = {"y": y, **{f"d{name}": got[name].grad for name in names}}
    assert (t["weight"] if case.path == "dense" else t["packed"]).grad is None
    for name, value in actual.items():
        assert value is not None and value.dtype == case.dtype, f"{name}: {value}"
        precise, same = expected["precise"][name], expected["same"][name]
        assert precise.abs().max() > 0, f"{name}: degenerate case"
        assert_close_3way(f"{case.id} {name}", value, precise, same)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dora_matches_reference(case, kernel_device):
    _check_case(case, kernel_device)


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.id)
def test_dora_with_dropout_matches_reference(case, kernel_device):
    _check_case(case, kernel_device)


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[7]], ids=lambda c: c.id)
def test_dropout_route_with_nothing_dropped_is_dora(case, kernel_device, monkeypatch):
    """p = 1e-9 drops nothing (its threshold rounds to 0, 1 / (1 - p) to 1 in fp32) but runs the dropout route:
    x·Wᵀ + bias + (g − 1) ⊙ x·Wᵀ + g ⊙ s·(x·Aᵀ)·Bᵀ must be the dropout-free DoRA, forward and every gradient."""
    calls = []
    forward = lora_engine.autograd._dora_dropout_forward
    monkeypatch.setattr(lora_engine.autograd, "_dora_dropout_forward", lambda *a: calls.append(1) or forward(*a))
    _check_case(case, kernel_device, dropout_p=1e-9)
    assert calls, "the dropout route did not run"


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

    # dropout in training: PEFT's DoraLinearVariant passes drop(x) and no base result, so the layer adds a second
    # base product of the dropped input, without the bias, to base(x); here drop(x) uses the reference's mask
    p, seed = 0.3, 17
    keep = reference.dropout_keep_mask(seed, 5, k, p)
    x_drop = x * keep / (1 - p)
    expected = base(x) + dora(x_drop, lora_A=lora_A, lora_B=lora_B, scaling=s, base_layer=base, base_result=None)
    got = reference.dora_linear_4bit(
        x, packed, state, lora_A.weight, lora_B.weight, dora.weight, s, base.bias, p, True, dropout_seed=seed
    )
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
        dense_args = (t["x"], t["weight"], t["lora_A"], t["lora_B"])
        with pytest.raises(ValueError, match=r"magnitude must be \(out_features,\) = \(37,\)"):
            lora_engine.dora_linear(*dense_args, torch.ones(36, device=kernel_device), 1.0)
        with pytest.raises(ValueError, match="dora_linear: weight must be a 2-D tensor"):
            lora_engine.dora_linear(t["x"], t["weight"][None], *dense_args[2:], t["magnitude"], 1.0)
        with pytest.raises(ValueError, match="frozen"):
            lora_engine.dora_linear(t["x"], t["weight"].clone().requires_grad_(), *dense_args[2:], t["magnitude"], 1.0)


@pytest.mark.parametrize("case", [CASES[2], CASES[7]], ids=lambda c: c.id)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_double_backward_matches_reference(dropout, case, kernel_device):
    """create_graph=True runs the gradients as torch operations: second-order terms through A, B and m are exact."""
    t = _inputs(case, kernel_device)
    results = []
    for backend in ("triton", "torch"):
        x, lora_A, lora_B, magnitude = (t[n].detach().clone().requires_grad_() for n in ("x", "lora_A", "lora_B",
                                                                                          "magnitude"))  # fmt: skip
        with lora_engine.use_backend(backend):
            y = _dora(case, t, x, lora_A, lora_B, magnitude, 1.7, t["bias"], dropout, True, dropout_seed=3)
        (dx,) = torch.autograd.grad(y, x, t["dy"], create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), (lora_A, lora_B, magnitude)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_compiled_reference_with_dropout_has_no_graph_breaks(kernel_device):
    """Where DoRA runs the reference (backend "torch"), torch.compile traces its torch operations, the dropout seed
    included: given, the compiled call drops what the eager one drops; left to draw, it is drawn as a tensor, so the
    graph holds. (On the kernels, compiled DoRA runs the adapter op: tests/integrations/test_compile.py.)"""
    t = _inputs(CASES[3], kernel_device)
    args = (t["x"], t["packed"], t["state"], t["lora_A"], t["lora_B"], t["magnitude"], 1.7, t["bias"], 0.2, True)

    def layer(*args, dropout_seed=None):
        return lora_engine.dora_linear_4bit(*args, dropout_seed=dropout_seed)

    with lora_engine.use_backend("torch"):
        explanation = torch._dynamo.explain(layer)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert "lora_engine.adapter_linear_fwd" not in explanation.graphs[0].code, "backend torch: no kernel op"
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        got, other_seed = compiled(*args, dropout_seed=9), compiled(*args, dropout_seed=10)
    expected = reference.dora_linear_4bit(*args, dropout_seed=9)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, other_seed), "the seed made no difference: no dropout ran"


@pytest.mark.parametrize("case", [CASES[2], CASES[7]], ids=lambda c: c.id)
def test_cached_row_norms_follow_bytes_rewritten_in_place(case, kernel_device):
    """‖W‖² is cached per weight; bytes and statistics copied in place (same addresses, as a state-dict load into the
    existing tensors does) must give the new weight's norms, not the cached ones."""
    t = _inputs(case, kernel_device)
    other = _inputs(dataclasses.replace(case, rank=case.rank + 1), kernel_device)  # the same format, other values
    args = (t["lora_A"].float(), t["lora_B"].float(), t["magnitude"].float(), 1.3)

    def run():
        with lora_engine.use_backend("triton"):
            return _dora(case, t, t["x"].float(), *args)

    run()  # fills the cache
    if case.path == "dense":
        t["weight"].copy_(other["weight"])
    else:
        t["packed"].copy_(other["packed"])
        t["state"].absmax.copy_(other["state"].absmax)
    with lora_engine.use_backend("torch"):
        expected = _dora(case, t, t["x"].float(), *args)
    torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-4)


def test_cached_row_norms_tell_views_of_one_storage_apart(kernel_device):
    """A square dense W and its transpose share storage, address and size: each must get its own row norms."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 24, generator=gen).to(kernel_device)
    x = torch.randn(3, 24, generator=gen).to(kernel_device)
    lora_A = (0.3 * torch.randn(4, 24, generator=gen)).to(kernel_device)
    lora_B = torch.zeros(24, 4, device=kernel_device)
    magnitude = torch.ones(24, device=kernel_device)
    for w in (weight, weight.t(), weight):
        with lora_engine.use_backend("triton"):
            got = lora_engine.dora_linear(x, w, lora_A, lora_B, magnitude, 1.0)
        # B = 0, m = 1: y = x·Wᵀ / ‖W‖ row by row
        expected = (x @ w.t()) / w.norm(dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_row_norm_cache_follows_a_storage_resized_in_place():
    """FSDP2 frees its gathered buffer after each step and refills it before the next (``resize_`` on the same
    storage): the norms follow the new bytes wherever the allocator puts them, and an old address's entry goes."""
    from lora_engine import format as fmt

    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(8, 16, generator=gen)
    storage, nbytes = weight.untyped_storage(), weight.untyped_storage().nbytes()
    torch.testing.assert_close(fmt.row_norms_sq_cached(weight), weight.square().sum(1))

    def refill_and_check():
        with torch.no_grad():
            weight.copy_(torch.randn(8, 16, generator=gen))
        torch.testing.assert_close(fmt.row_norms_sq_cached(weight), weight.square().sum(1))
        assert len(fmt._row_norm_cache.get(storage)) == 1

    # FSDP2's free and refill: the allocator may hand back the old address or another
    storage.resize_(0)
    storage.resize_(nbytes)
    refill_and_check()
    # a move the allocator cannot undo: growing a storage copies its bytes into a new block while the old one is
    # still held, so the address must change and the old address's entry must be dropped
    old_address = weight.data_ptr()
    storage.resize_(2 * nbytes)
    assert weight.data_ptr() != old_address
    refill_and_check()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_norm_weight_is_what_the_norm_reads(backend, kernel_device, monkeypatch):
    """``dora_linear(..., norm_weight=W32)`` over ``weight`` = W32 cast to fp16 (autocast's per-call copy) reads ‖W‖²
    from W32. With B = 0 the norm is ‖norm_weight‖ alone, so a norm_weight of 2·W32 must halve y = m ⊙ x·Wᵀ / ‖·‖;
    the kernels read its ‖·‖² through the per-weight cache, never the copy's."""
    gen = torch.Generator().manual_seed(11)
    w32 = torch.randn(37, 100, generator=gen).to(kernel_device)
    x = torch.randn(5, 100, generator=gen).to(kernel_device, F16)
    lora_A = (0.3 * torch.randn(4, 100, generator=gen)).to(kernel_device, F16)
    lora_B = torch.zeros(37, 4, device=kernel_device, dtype=F16)
    magnitude = (5.0 + torch.randn(37, generator=gen)).to(kernel_device, F16)
    norm_weight = 2 * w32
    read = []
    cached = lora_engine.functional.row_norms_sq_cached
    monkeypatch.setattr(lora_engine.functional, "row_norms_sq_cached", lambda w: read.append(w) or cached(w))
    with lora_engine.use_backend(backend):
        got = [lora_engine.dora_linear(x, w32.half(), lora_A, lora_B, magnitude, 1.3, norm_weight=norm_weight)
               for _ in range(2)]  # fmt: skip
    precise = (x.double() @ w32.double().t()) * magnitude.double() / norm_weight.double().norm(dim=1)
    same = ((x @ w32.half().t()) * (magnitude / norm_weight.norm(dim=1).half())).to(F16)
    for y in got:
        assert_close_3way(f"{backend} y", y, precise, same)
    assert all(w is norm_weight for w in read) and len(read) == (2 if backend == "triton" else 0), read


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_norm_weight_raises(backend, kernel_device):
    t = _inputs(CASES[7], kernel_device)
    args = (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 1.0)
    with lora_engine.use_backend(backend):
        with pytest.raises(ValueError, match=r"dora_linear: norm_weight has shape \(37, 99\) but weight \(37, 100\)"):
            lora_engine.dora_linear(*args, norm_weight=t["weight"][:, :-1].float())
        with pytest.raises(TypeError, match="dora_linear: norm_weight must be floating point"):
            lora_engine.dora_linear(*args, norm_weight=torch.ones(37, 100, dtype=torch.int64, device=kernel_device))
        with pytest.raises(ValueError, match="norm_weight.requires_grad is True"):
            lora_engine.dora_linear(*args, norm_weight=t["weight"].clone().requires_grad_())
        with pytest.raises(TypeError, match="norm_weight must be a tensor, got list"):
            lora_engine.dora_linear(*args, norm_weight=[[1.0]])

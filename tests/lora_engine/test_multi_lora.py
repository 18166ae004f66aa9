"""A mixed batch of LoRA adapters (``multi_lora_linear_4bit``, ``LoRALinear4bit(x, adapter_indices=...)``) against
the reference: three adapters of ranks 4, 8 and 16 with their own scalings, rows of no adapter, rows in shuffled
adapter order, NF4 and FP4, nested and plain absmax, by the three-way rule; and its errors.
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

RANKS = (4, 8, 16)
SCALINGS = (2.0, 0.5, 1.25)
F16, F32 = torch.float16, torch.float32


@dataclass(frozen=True)
class Case:
    m: int
    quant_type: str
    nested: bool
    dtype: torch.dtype
    bias: bool
    per_sample: bool = False  # indices of shape (x.shape[0],): one per sample of a [3, 11, K] input

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        nest = "nested" if self.nested else "plain"
        rows = "per_sample" if self.per_sample else "per_row"
        return f"M{self.m}-{self.quant_type}-{nest}-{dt}-{'bias' if self.bias else 'nobias'}-{rows}"


CASES = [
    Case(1, "nf4", True, F32, True),
    Case(7, "fp4", False, F16, True),
    Case(7, "nf4", False, F32, False),
    Case(33, "nf4", True, F16, False),
    Case(33, "fp4", True, F32, True),
    Case(33, "nf4", False, F16, True, per_sample=True),
]


def _inputs(case: Case, device: str) -> dict:
    n, k, blocksize = 37, 75, 32  # K odd: rows start mid-byte; blocks straddle rows
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    dense = randn(n, k, std=0.5).to(case.dtype)
    packed, state = bnbF.quantize_4bit(
        dense, blocksize=blocksize, quant_type=case.quant_type, compress_statistics=case.nested
    )
    if case.per_sample:
        x, indices = randn(3, 11, k), torch.tensor([1, -1, 2])
    elif case.m == 1:
        x, indices = randn(1, k), torch.tensor([2])
    else:
        indices = torch.randint(-1, len(RANKS), (case.m,), generator=gen)
        indices[:4] = torch.arange(-1, len(RANKS))  # every adapter and the base, then shuffled
        indices = indices[torch.randperm(case.m, generator=gen)]
        x = randn(case.m, k)
        if case.m == 33:
            x, indices = x.reshape(3, 11, k), indices.reshape(3, 11)  # leading dims, one index per row
    return dict(
        packed=packed,
        state=state,
        x=x.to(case.dtype),
        As=[randn(r, k, std=0.3) for r in RANKS],
        Bs=[randn(n, r, std=0.3) for r in RANKS],
        bias=randn(n).to(case.dtype) if case.bias else None,
        indices=indices,
    )


def _torch_mixed(x, weight, As, Bs, indices, bias, dtype):
    """The mixed batch in plain torch operations in ``dtype``."""
    k = x.shape[-1]
    rows = (
        indices.reshape(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]) if indices.shape != x.shape[:-1] else indices
    )
    x2d, rows = x.to(dtype).reshape(-1, k), rows.reshape(-1)
    y = x2d @ weight.to(dtype).t()
    for i, (lora_A, lora_B, scaling) in enumerate(zip(As, Bs, SCALINGS)):
        sel = (rows == i).nonzero().flatten()
        y[sel] = y[sel] + scaling * ((x2d[sel] @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t())
    if bias is not None:
        y = y + bias.to(dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mixed_batch_matches_reference(case, kernel_device):
    t = _inputs(case, kernel_device)
    w32 = reference.dequantize_4bit(t["packed"], t["state"], torch.float32)
    args = (t["packed"], t["state"], t["As"], t["Bs"], list(SCALINGS), t["indices"])
    with torch.no_grad(), lora_engine.use_backend("triton"):
        y = lora_engine.multi_lora_linear_4bit(t["x"], *args, bias=t["bias"])
    precise = _torch_mixed(t["x"], w32, t["As"], t["Bs"], t["indices"], t["bias"], torch.float64)
    same = _torch_mixed(t["x"], w32, t["As"], t["Bs"], t["indices"], t["bias"], case.dtype)
    assert y.dtype == case.dtype and y.shape == t["x"].shape[:-1] + (w32.shape[0],)
    assert_close_3way(f"{case.id} y", y, precise, same)
    # the reference itself agrees with the float64 computation
    ref = reference.multi_lora_linear_4bit(t["x"], *args, bias=t["bias"])
    assert_close_3way(f"{case.id} reference", ref, precise, same)


GRAD_CASES = [Case(7, "fp4", True, F32, True), Case(33, "nf4", False, F16, True)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_mixed_batch_gradients_match_reference(case, kernel_device):
    """dx, dbias and the gradient of every adapter's A and B, each adapter's only from its own rows."""
    t = _inputs(case, kernel_device)
    w32 = reference.dequantize_4bit(t["packed"], t["state"], torch.float32)
    dy = torch.randn(*t["x"].shape[:-1], w32.shape[0], generator=torch.Generator().manual_seed(5)).to(t["x"])

    def leaves(dtype):
        return dict(
            x=t["x"].detach().to(dtype).requires_grad_(),
            bias=t["bias"].detach().to(dtype).requires_grad_(),
            As=[a.detach().to(dtype).requires_grad_() for a in t["As"]],
            Bs=[b.detach().to(dtype).requires_grad_() for b in t["Bs"]],
        )

    def grads(v):
        return {"dx": v["x"].grad, "dbias": v["bias"].grad,
                **{f"dA{i}": a.grad for i, a in enumerate(v["As"])},
                **{f"dB{i}": b.grad for i, b in enumerate(v["Bs"])}}  # fmt: skip

    got = leaves(case.dtype)
    with lora_engine.use_backend("triton"):
        y = lora_engine.multi_lora_linear_4bit(
            got["x"], t["packed"], t["state"], got["As"], got["Bs"], list(SCALINGS), t["indices"], bias=got["bias"]
        )
    y.backward(dy)
    expected = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        ref = leaves(dtype)
        _torch_mixed(ref["x"], w32, ref["As"], ref["Bs"], t["indices"], ref["bias"], dtype).backward(dy.to(dtype))
        expected[label] = {"y": None, **grads(ref)}
    assert t["packed"].grad is None
    for name, value in grads(got).items():
        precise, same = expected["precise"][name], expected["same"][name]
        assert value is not None and value.dtype == case.dtype, name
        assert precise.abs().max() > 0, f"{name}: degenerate case"
        assert_close_3way(f"{case.id} {name}", value, precise, same)


def test_rows_of_no_adapter_equal_the_base_layer(kernel_device):
    t = _inputs(Case(7, "nf4", True, F32, True), kernel_device)
    with torch.no_grad(), lora_engine.use_backend("triton"):
        y = lora_engine.multi_lora_linear_4bit(
            t["x"], t["packed"], t["state"], t["As"], t["Bs"], list(SCALINGS), t["indices"], bias=t["bias"]
        )
        base = lora_engine.linear_4bit(t["x"], t["packed"], t["state"], t["bias"])
    rows = t["indices"] < 0
    assert rows.any() and (~rows).any()
    assert torch.equal(y[rows], base[rows])
    assert (y[~rows] - base[~rows]).abs().max() > 1e-3


def test_torch_backend_runs_the_reference():
    t = _inputs(Case(7, "fp4", False, F32, True), "cpu")
    args = (t["x"], t["packed"], t["state"], t["As"], t["Bs"], list(SCALINGS), t["indices"], t["bias"])
    with lora_engine.use_backend("torch"):
        y = lora_engine.multi_lora_linear_4bit(*args)
    assert torch.equal(y, reference.multi_lora_linear_4bit(*args))


def test_torch_backend_under_torch_compile_traces_the_reference():
    """The reference traces whole too: its index range check runs in the graph (the kernels' op is covered in
    tests/integrations/test_compile.py)."""
    t = _inputs(Case(7, "nf4", True, F32, True), "cpu")
    args = (t["packed"], t["state"], t["As"], t["Bs"], list(SCALINGS))
    compiled = torch.compile(
        lambda x, idx: lora_engine.multi_lora_linear_4bit(x, *args, idx, t["bias"]), backend="eager", fullgraph=True
    )
    with torch.no_grad(), lora_engine.use_backend("torch"):
        y = compiled(t["x"], t["indices"])
        with pytest.raises(RuntimeError, match=r"must lie in \[-1, 3\)"):
            compiled(t["x"], torch.full((7,), 3))
    torch.testing.assert_close(y, reference.multi_lora_linear_4bit(t["x"], *args, t["indices"], t["bias"]))


def test_errors_name_the_problem(kernel_device):
    t = _inputs(Case(7, "nf4", False, F32, False), kernel_device)
    x, packed, state, As, Bs = t["x"], t["packed"], t["state"], t["As"], t["Bs"]
    idx = t["indices"]
    f = lora_engine.multi_lora_linear_4bit
    with torch.no_grad(), lora_engine.use_backend("triton"):
        with pytest.raises(ValueError, match=r"must lie in \[-1, 3\)"):
            f(x, packed, state, As, Bs, list(SCALINGS), torch.full((7,), 3))
        with pytest.raises(ValueError, match="adapter_indices must have shape"):
            f(x, packed, state, As, Bs, list(SCALINGS), idx[:5])
        with pytest.raises(TypeError, match="integer tensor"):
            f(x, packed, state, As, Bs, list(SCALINGS), idx.float())
        with pytest.raises(ValueError, match="one lora_A, lora_B and scaling per adapter"):
            f(x, packed, state, As, Bs[:2], list(SCALINGS), idx)
        with pytest.raises(ValueError, match="adapter 1: lora_B must be"):
            f(x, packed, state, As, [Bs[0], Bs[0], Bs[2]], list(SCALINGS), idx)


def test_module_adapter_indices(kernel_device):
    torch.manual_seed(0)
    layer = lora_engine.LoRALinear4bit(75, 37, bias=True, r=4, lora_alpha=8, adapter_name="a").to(kernel_device)
    layer.add_adapter("b", r=16, lora_alpha=4)
    for name in layer.adapter_names:
        pair = layer.get_adapter(name)
        with torch.no_grad():
            pair.lora_B.normal_(0, 0.3)
    x = torch.randn(2, 5, 75, device=kernel_device)
    indices = torch.tensor([[0, 1, -1, 1, 0], [-1, -1, 0, 1, 1]])
    with torch.no_grad(), lora_engine.use_backend("triton"):
        y = layer(x, adapter_indices=indices)
        expected = torch.empty_like(y)
        for i, name in enumerate(layer.adapter_names):  # one adapter at a time, through the single-adapter path
            layer.set_adapter(name)
            expected[indices == i] = layer(x)[indices == i]
        layer.set_adapter(None)
        expected[indices == -1] = layer(x)[indices == -1]
    assert layer.active_adapter is None
    assert (y - expected).abs().max() < 1e-4, (y - expected).abs().max()
    layer.train()
    layer.add_adapter("c", r=2, lora_dropout=0.1)
    with torch.no_grad(), pytest.raises(ValueError, match="dropout"):
        layer(x, adapter_indices=torch.tensor([2, 0]))
    layer.delete_adapter("c")
    y = layer(x, adapter_indices=torch.tensor([1, 0]))  # training without dropout: gradients for every factor
    y.square().sum().backward()
    assert all(layer.get_adapter(name).lora_B.grad.abs().max() > 0 for name in ("a", "b"))

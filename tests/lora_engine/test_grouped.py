"""Grouped projections (``lora_engine.grouped``) against each member computed on its own: output, dx, every dA_i,
dB_i and dbias by the three-way rule; G = 2 and 3, members of different widths and ranks, a member without LoRA,
NF4 and FP4, nested and plain absmax, odd token counts; the backward decodes again; bad input is named.

Each case builds three copies: the grouped path, plain torch per member in the same dtype, and float64 (see
``lora_engine.testing.assert_close_3way``).
"""

import zlib
from dataclasses import dataclass

import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_engine
import lora_engine.kernels.dequantize
from lora_engine import reference
from lora_engine.grouped import GroupMember, GroupedLoRA4bitFunction, grouped_lora_linear_4bit
from lora_engine.testing import assert_close_3way


@dataclass(frozen=True)
class Case:
    m: int
    k: int
    sizes: tuple  # N_i
    ranks: tuple  # r_i, 0 for a member without LoRA
    biases: tuple  # whether member i has a (trainable) bias
    quant_type: str
    nested: bool
    dtype: torch.dtype
    backend: str = "triton"

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        nest = "nested" if self.nested else "plain"
        members = "+".join(f"{n}r{r}{'b' if b else ''}" for n, r, b in zip(self.sizes, self.ranks, self.biases))
        return f"M{self.m}-K{self.k}-{members}-{self.quant_type}-{nest}-{dt}-{self.backend}"


CASES = [
    # q/k/v shaped like the tiny Llama's (k and v narrower: grouped-query attention), k without LoRA
    Case(7, 64, (64, 32, 32), (8, 0, 4), (False, False, True), "nf4", True, torch.float32),
    # gate/up, K and N that 64-element blocks do not divide, fp16, leading dims and a non-contiguous x
    Case(33, 96, (37, 45), (8, 16), (False, False), "fp4", False, torch.float16),
    Case(1, 96, (45, 37, 24), (4, 8, 2), (True, False, False), "nf4", False, torch.float32),
    Case(33, 64, (96, 96), (0, 8), (False, True), "fp4", True, torch.float32),
    # the torch backend: the reference decode, products in fp32
    Case(7, 96, (37, 24, 24), (8, 0, 8), (True, False, False), "nf4", True, torch.float16, "torch"),
]


def _inputs(case: Case, device: str) -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    members = []
    for n, r, b in zip(case.sizes, case.ranks, case.biases):
        dense = randn(n, case.k, std=0.5).to(case.dtype)
        packed, state = bnbF.quantize_4bit(
            dense, blocksize=64, quant_type=case.quant_type, compress_statistics=case.nested
        )
        lora_A = randn(r, case.k, std=0.3).to(case.dtype) if r else None
        lora_B = randn(n, r, std=0.3).to(case.dtype) if r else None
        bias = randn(n).to(case.dtype) if b else None
        members.append(dict(packed=packed, state=state, A=lora_A, B=lora_B, bias=bias, scaling=0.5 + r / 8))
    if case.m == 33:  # leading dims and a non-contiguous view
        x = randn(3, 11, case.k + 5)[..., 2 : case.k + 2].to(case.dtype)
    else:
        x = randn(case.m, case.k).to(case.dtype)
    dys = [randn(*x.shape[:-1], n).to(case.dtype) for n in case.sizes]
    return dict(members=members, x=x, dys=dys)


def _leaves(t: dict, dtype: torch.dtype):
    """Fresh leaf copies of x and every trainable tensor, in ``dtype``."""

    def leaf(v):
        return v.detach().to(dtype).requires_grad_() if v is not None else None

    return leaf(t["x"]), [{k: leaf(m[k]) for k in ("A", "B", "bias")} for m in t["members"]]


def _torch_per_member(t: dict, dtype: torch.dtype, dropouts: tuple = ()):
    """Each member on its own with torch ops in ``dtype`` (the weight decoded in fp32, then cast); ``dropouts``
    gives member i's (p, seed) or None, its mask drawn by ``reference.dropout_keep_mask``."""
    x, params = _leaves(t, dtype)
    x2d = x.reshape(-1, x.shape[-1])
    outs = []
    for i, (m, p) in enumerate(zip(t["members"], params)):
        w = reference.dequantize_4bit(m["packed"], m["state"], torch.float32).to(dtype)
        y = x @ w.t()
        if p["A"] is not None:
            xd = x
            if i < len(dropouts) and dropouts[i] is not None:
                prob, seed = dropouts[i]
                keep = reference.dropout_keep_mask(seed, *x2d.shape, prob, x.device).reshape(x.shape)
                xd = x * keep.to(dtype) / (1 - prob)
            y = y + m["scaling"] * ((xd @ p["A"].t()) @ p["B"].t())
        if p["bias"] is not None:
            y = y + p["bias"]
        outs.append(y)
    return x, params, outs


def _grads(x, params):
    grads = [("dx", x.grad)]
    for i, p in enumerate(params):
        grads += [(f"d{k}_{i}", p[k].grad) for k in ("A", "B", "bias") if p[k] is not None]
    return grads


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_per_member_reference(case, kernel_device, monkeypatch):
    decodes = []
    decode = lora_engine.kernels.dequantize.dequantize_4bit
    monkeypatch.setattr(
        lora_engine.kernels.dequantize, "dequantize_4bit", lambda *a, **kw: decodes.append(1) or decode(*a, **kw)
    )
    t = _inputs(case, kernel_device)
    x, params = _leaves(t, case.dtype)
    members = [
        GroupMember(m["packed"], m["state"], p["A"], p["B"], m["scaling"], p["bias"])
        for m, p in zip(t["members"], params)
    ]
    with lora_engine.use_backend(case.backend):
        outs = grouped_lora_linear_4bit(x, members)
        decoded_in_forward = len(decodes)
        torch.autograd.backward(outs, t["dys"])
    # the Triton decode writes each member into the call's buffer, once per pass: nothing dense is kept
    g = len(case.sizes)
    assert (decoded_in_forward, len(decodes)) == ((g, 2 * g) if case.backend == "triton" else (0, 0))

    expected = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        xr, pr, yr = _torch_per_member(t, dtype)
        torch.autograd.backward(yr, [dy.to(dtype) for dy in t["dys"]])
        expected[label] = [(f"y_{i}", y) for i, y in enumerate(yr)] + _grads(xr, pr)
    got = [(f"y_{i}", y) for i, y in enumerate(outs)] + _grads(x, params)
    assert [name for name, _ in got] == [name for name, _ in expected["precise"]]
    for (name, value), (_, precise), (_, same) in zip(got, expected["precise"], expected["same"]):
        assert value is not None, f"{name}: no gradient"
        assert value.dtype == case.dtype and value.shape == precise.shape, f"{name}: {value.dtype} {value.shape}"
        assert precise.abs().max() > 0, f"{name}: degenerate case, the reference is all zero"
        assert_close_3way(f"{case.id} {name}", value, precise.detach(), same.detach())
    assert all(m["packed"].grad is None for m in t["members"]), "the frozen 4-bit weights must get no gradient"


DROPOUT_CASES = [
    # q and v with dropout, k without LoRA: every member with LoRA reads its own dropped input
    (CASES[0], ((0.25, 11), None, (0.5, 12))),
    # the first and last members with dropout, the middle one without: one shared rank block between them
    (CASES[2], ((0.3, 21), None, (0.1, 23))),
    (CASES[4], ((0.2, 31), None, None)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case, dropouts", DROPOUT_CASES, ids=lambda c: c.id if isinstance(c, Case) else "")
def test_dropout_matches_per_member_reference(case, dropouts, kernel_device):
    """Members with LoRA dropout against torch per member with the same masks: output and every gradient."""
    t = _inputs(case, kernel_device)
    x, params = _leaves(t, case.dtype)
    members = [
        GroupMember(m["packed"], m["state"], p["A"], p["B"], m["scaling"], p["bias"],
                    *((d[0], d[1]) if d is not None else (0.0, None)))
        for m, p, d in zip(t["members"], params, dropouts)
    ]  # fmt: skip
    with lora_engine.use_backend(case.backend):
        outs = grouped_lora_linear_4bit(x, members)
        torch.autograd.backward(outs, t["dys"])
    expected = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        xr, pr, yr = _torch_per_member(t, dtype, dropouts)
        torch.autograd.backward(yr, [dy.to(dtype) for dy in t["dys"]])
        expected[label] = [(f"y_{i}", y) for i, y in enumerate(yr)] + _grads(xr, pr)
    got = [(f"y_{i}", y) for i, y in enumerate(outs)] + _grads(x, params)
    for (name, value), (_, precise), (_, same) in zip(got, expected["precise"], expected["same"]):
        assert value is not None, f"{name}: no gradient"
        assert_close_3way(f"{case.id} dropout {name}", value, precise.detach(), same.detach())
    # the masks matter: without them the LoRA terms differ
    _, _, undropped = _torch_per_member(t, torch.float64)
    i = next(i for i, d in enumerate(dropouts) if d is not None)
    assert not torch.allclose(outs[i].double(), undropped[i], rtol=1e-3, atol=1e-3)


@pytest.mark.interpreter
def test_inference_matches_reference_functions(kernel_device):
    """Without gradients (no autograd node), against lora_engine.reference's per-layer functions."""
    case = CASES[0]
    t = _inputs(case, kernel_device)
    members = [GroupMember(m["packed"], m["state"], m["A"], m["B"], m["scaling"], m["bias"]) for m in t["members"]]
    with lora_engine.use_backend("triton"), torch.no_grad():
        outs = grouped_lora_linear_4bit(t["x"], members)
    for i, (m, y) in enumerate(zip(t["members"], outs)):
        if m["A"] is not None:
            ref = reference.lora_linear_4bit(t["x"], m["packed"], m["state"], m["A"], m["B"], m["scaling"], m["bias"])
        else:
            ref = reference.linear_4bit(t["x"], m["packed"], m["state"], m["bias"])
        assert y.grad_fn is None
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=f"member {i}")


def test_wrong_shapes_name_the_member():
    t = _inputs(CASES[2], "cpu")
    m = t["members"]
    members = [GroupMember(mm["packed"], mm["state"], mm["A"], mm["B"], mm["scaling"]) for mm in m]
    with lora_engine.use_backend("torch"):
        with pytest.raises(ValueError, match="member 1: .*lora_B must be"):
            bad = members[:1] + [members[1]._replace(lora_B=m[1]["B"][:5])] + members[2:]
            grouped_lora_linear_4bit(t["x"], bad)
        with pytest.raises(ValueError, match="member 0: x's last dimension must be in_features=96"):
            grouped_lora_linear_4bit(t["x"][:, :64], members)
        with pytest.raises(ValueError, match="member 2: give both lora_A and lora_B"):
            grouped_lora_linear_4bit(t["x"], members[:2] + [members[2]._replace(lora_B=None)])
        with pytest.raises(ValueError, match="member 1: dropout_p must be in"):
            grouped_lora_linear_4bit(t["x"], members[:1] + [members[1]._replace(dropout_p=1.0)] + members[2:])
        with pytest.raises(ValueError, match="at least one member"):
            grouped_lora_linear_4bit(t["x"], [])


def test_function_is_exported():
    assert issubclass(GroupedLoRA4bitFunction, torch.autograd.Function)

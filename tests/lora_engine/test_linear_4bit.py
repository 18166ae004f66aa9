"""linear_4bit (a 4-bit layer without an adapter) against the definition: output, dx and dbias by the three-way
rule, on every path forced, NF4 and FP4, nested and plain absmax, odd shapes; bad input is named; the dispatcher's
base-only table.

Each case builds three copies of the inputs: the Triton path, plain torch in the same dtype, and float64 (see
``lora_engine.testing.assert_close_3way``).
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
from lora_engine.format import quantize_weight
from lora_engine.kernels.operands import Packed4bit
from lora_engine.testing import assert_close_3way

# (N, K, blocksize): N and K are multiples of no tile size.
SHAPES = {
    "straddle": (37, 100, 64),  # K % blocksize != 0: blocks straddle rows (the gemv path falls back to dequant)
    "odd_k": (45, 75, 32),  # K odd: every other row starts in the middle of a byte
    "aligned": (70, 96, 32),  # blocksize divides K: one scale per row per K step
}


@dataclass(frozen=True)
class Case:
    m: int
    quant_type: str
    nested: bool
    dtype: torch.dtype
    bias: bool
    path: str
    shape: str

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        nest = "nested" if self.nested else "plain"
        return f"M{self.m}-{self.quant_type}-{nest}-{dt}-{'bias' if self.bias else 'nobias'}-{self.path}-{self.shape}"


def _cases() -> list[Case]:
    """Every path with each quant type, nesting and bias; token counts and shapes spread over them (few cases:
    the interpreter is slow)."""
    primary = list(itertools.product(dispatch.PATHS, ["nf4", "fp4"], [False, True]))
    secondary = list(itertools.product([1, 7, 33], [torch.float32, torch.float16], [True, False], SHAPES))
    random.Random(0).shuffle(secondary)
    cases = [Case(m, qt, nested, dtype, bias, path, shape)
             for (path, qt, nested), (m, dtype, bias, shape) in zip(primary, secondary)]  # fmt: skip
    # the gemv path on a weight it reads row by row, with and without bias
    cases += [Case(1, "nf4", True, torch.float32, True, "gemv", "aligned"),
              Case(7, "fp4", False, torch.float16, False, "gemv", "aligned")]  # fmt: skip
    return cases


CASES = _cases()


def _inputs(case: Case, device: str) -> dict:
    n, k, blocksize = SHAPES[case.shape]
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    dense = randn(n, k, std=0.5).to(case.dtype)
    packed, state = bnbF.quantize_4bit(
        dense, blocksize=blocksize, quant_type=case.quant_type, compress_statistics=case.nested
    )
    if case.m == 33:  # leading dims and a non-contiguous view
        x = randn(3, 11, k + 5)[..., 2 : k + 2].to(case.dtype)
    else:
        x = randn(case.m, k).to(case.dtype)
    bias = randn(n).to(case.dtype) if case.bias else None
    return dict(packed=packed, state=state, x=x, bias=bias, dy=randn(*x.shape[:-1], n).to(case.dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, kernel_device, monkeypatch):
    gemv_launches = []
    gemv = lora_engine.autograd.lora_gemv_4bit
    monkeypatch.setattr(
        lora_engine.autograd, "lora_gemv_4bit", lambda *a, **kw: gemv_launches.append(1) or gemv(*a, **kw)
    )
    t = _inputs(case, kernel_device)
    w32 = reference.dequantize_4bit(t["packed"], t["state"], torch.float32)

    def leaves(dtype):
        x = t["x"].detach().to(dtype).requires_grad_()
        bias = t["bias"].detach().to(dtype).requires_grad_() if t["bias"] is not None else None
        return x, bias

    x, bias = leaves(case.dtype)
    with lora_engine.use_backend("triton"), lora_engine.force_path(case.path):
        y = lora_engine.linear_4bit(x, t["packed"], t["state"], bias)
    y.backward(t["dy"])

    results = {}
    for label, dtype in (("precise", torch.float64), ("same", case.dtype)):
        xr, br = leaves(dtype)
        yr = xr @ w32.to(dtype).t()
        yr = yr + br if br is not None else yr
        yr.backward(t["dy"].to(dtype))
        results[label] = (yr, xr.grad, br.grad if br is not None else None)

    assert y.dtype == case.dtype and y.shape == t["x"].shape[:-1] + (w32.shape[0],)
    assert t["packed"].grad is None, "the frozen 4-bit weight must get no gradient"
    got = [("y", y), ("dx", x.grad)] + ([("dbias", bias.grad)] if bias is not None else [])
    for i, (name, value) in enumerate(got):
        assert value.dtype == case.dtype, f"{name} dtype {value.dtype}"
        precise, same = results["precise"][i], results["same"][i]
        assert precise.abs().max() > 0, f"{name}: degenerate case, the reference is all zero"
        assert_close_3way(f"{case.id} {name}", value, precise, same)
    n, k, blocksize = SHAPES[case.shape]
    # the GEMV serves at most 16 tokens over rows that hold whole blocks; other calls take the dequant path
    expected_gemv = int(case.path == "gemv" and x.numel() // k <= 16 and k % blocksize == 0)
    assert len(gemv_launches) == expected_gemv, f"the gemv kernel ran {len(gemv_launches)} times"


@pytest.mark.interpreter
def test_no_dense_weight_kept_for_the_backward(kernel_device, monkeypatch):
    """The backward decodes W again (one decode per pass): nothing dense lives between forward and backward."""
    decodes = []
    decode = lora_engine.autograd.dequantize_4bit
    monkeypatch.setattr(lora_engine.autograd, "dequantize_4bit", lambda *a, **kw: decodes.append(1) or decode(*a, **kw))
    t = _inputs(Case(7, "nf4", True, torch.float32, True, "dequant", "straddle"), kernel_device)
    x = t["x"].requires_grad_()
    with lora_engine.use_backend("triton"), lora_engine.force_path("dequant"):
        y = lora_engine.linear_4bit(x, t["packed"], t["state"], t["bias"])
        assert len(decodes) == 1
        node = y.grad_fn
        while not hasattr(node, "weight"):  # past the reshape to the function's node
            node = node.next_functions[0][0]
        assert node.saved_tensors == () and isinstance(node.weight, Packed4bit), "only the packed W is kept"
        y.backward(t["dy"])
    assert len(decodes) == 2


def test_reference_matches_precise():
    case = Case(33, "fp4", False, torch.float32, True, "dequant", "odd_k")
    t = _inputs(case, "cpu")
    y = reference.linear_4bit(t["x"], t["packed"], t["state"], t["bias"])
    w = reference.dequantize_4bit(t["packed"], t["state"])
    precise = t["x"].double() @ w.double().t() + t["bias"].double()
    assert_close_3way("reference y", y, precise, t["x"] @ w.t() + t["bias"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_bad_input_is_named(backend):
    t = _inputs(Case(7, "nf4", True, torch.float32, True, "dequant", "straddle"), "cpu")
    packed, state, x = t["packed"], t["state"], t["x"]
    with lora_engine.use_backend(backend):
        with pytest.raises(ValueError, match="in_features=100"):
            lora_engine.linear_4bit(x[:, :50], packed, state)
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            lora_engine.linear_4bit(x.double(), packed, state)
        with pytest.raises(ValueError, match=r"bias must be \(out_features,\) = \(37,\)"):
            lora_engine.linear_4bit(x, packed, state, torch.zeros(36))
        with pytest.raises(TypeError, match="bias must be a floating point tensor"):
            lora_engine.linear_4bit(x, packed, state, torch.zeros(37, dtype=torch.int64))
        with pytest.raises(TypeError, match="x must be a tensor"):
            lora_engine.linear_4bit(x.tolist(), packed, state)
    # a float quant_storage lets the packed weight require grad: refused, as the LoRA layer refuses it
    trainable = quantize_weight(torch.randn(37, 96), quant_storage=torch.float32).requires_grad_(True)
    with lora_engine.use_backend(backend), pytest.raises(ValueError, match="keeps the base weight frozen"):
        lora_engine.linear_4bit(torch.randn(7, 96), trainable, trainable.quant_state)
    with lora_engine.use_backend(backend):
        with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
            lora_engine.linear_4bit(x, packed, state, torch.zeros(37, device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# The base-only path table


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen architecture, as far as the dispatcher can tell."""

    def make(capability):
        monkeypatch.setattr(dispatch, "_capability", lambda index: capability)
        return torch.device("cuda", 0)

    return make


def test_base_table_keeps_bitsandbytes_below_4096_tokens_on_sm90(fake_gpu):
    device = fake_gpu((9, 0))
    choose = dispatch.choose_path
    assert choose(1, 4096, 4096, device, base_only=True) == "bitsandbytes"
    assert choose(4095, 4096, 4096, device, base_only=True) == "bitsandbytes"
    assert choose(4096, 4096, 4096, device, base_only=True) == "dequant_cublas"
    assert choose(1, 4096, 4096, device) == "dequant", "the LoRA table is unchanged"
    assert dispatch.bitsandbytes_token_limit(device) == 4096
    unknown = fake_gpu((12, 7))  # a GPU no table names: the same default
    assert [choose(m, 64, 64, unknown, base_only=True) for m in (1, 4096)] == ["bitsandbytes", "dequant_cublas"]
    # force_path decides base-only calls as well
    with lora_engine.force_path("gemv"):
        assert choose(1, 4096, 4096, device, base_only=True) == "gemv"


def test_base_table_runs_our_kernels_under_the_interpreter():
    for m in (1, 16, 4096, 100_000):
        assert dispatch.choose_path(m, 64, 64, torch.device("cpu"), base_only=True) == "dequant"
        assert dispatch.choose_path(m, 64, 64, None, base_only=True) == "dequant"


def test_base_tables_are_well_formed():
    tables = [dispatch.DEFAULT_BASE_PATH_STEPS, dispatch.DEFAULT_BASE_CUDA_STEPS, *dispatch.BASE_PATH_STEPS.values()]
    for steps in tables:
        thresholds = [t for t, _ in steps]
        assert thresholds[0] == 0 and thresholds == sorted(set(thresholds)), steps
        assert all(path in dispatch.BASE_PATHS for _, path in steps), steps
        # bitsandbytes_token_limit and the report's wording read "bitsandbytes" as the first step only
        assert all(path != "bitsandbytes" for _, path in steps[1:]), steps
    assert "bitsandbytes" not in dispatch.DEFAULT_BASE_PATH_STEPS[0], "CPU tests must exercise our kernels"


@pytest.mark.interpreter
def test_bitsandbytes_path_off_cuda_takes_dequant_and_says_so(monkeypatch, caplog, kernel_device):
    """A table that picked "bitsandbytes" for CPU tensors (no such table ships) gets our dequant path, reported."""
    if kernel_device != "cpu":
        pytest.skip("checks the CPU interpreter")
    monkeypatch.setattr(dispatch, "DEFAULT_BASE_PATH_STEPS", ((0, "bitsandbytes"),))
    monkeypatch.setattr(dispatch, "_reported", set())
    t = _inputs(Case(7, "nf4", True, torch.float32, True, "dequant", "straddle"), kernel_device)
    with lora_engine.use_backend("triton"), caplog.at_level("WARNING", logger="lora_engine"):
        y = lora_engine.linear_4bit(t["x"], t["packed"], t["state"], t["bias"])
    torch.testing.assert_close(y, reference.linear_4bit(t["x"], t["packed"], t["state"], t["bias"]))
    assert any("serves CUDA tensors only" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7])
def test_bitsandbytes_path_is_bitsandbytes_own_matmul(m):
    """On CUDA below the table's limit the call returns exactly what bnb.matmul_4bit returns."""
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(m)
    dense = torch.randn(64, 128, generator=gen).to("cuda", torch.float16)
    packed, state = bnbF.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
    x, bias = (torch.randn(*shape, generator=gen).to("cuda", torch.float16) for shape in ((m, 128), (64,)))
    assert dispatch.choose_path(m, 64, 128, x.device, base_only=True) == "bitsandbytes"
    y = lora_engine.linear_4bit(x, packed, state, bias)
    assert torch.equal(y, bnb.matmul_4bit(x, packed, bias=bias, quant_state=state))


@pytest.mark.interpreter
def test_second_order_gradient_matches_torch(kernel_device):
    """create_graph=True (a gradient penalty): the input gradient is differentiated again, exactly."""
    t = _inputs(Case(7, "fp4", True, torch.float32, True, "dequant", "odd_k"), kernel_device)
    w = reference.dequantize_4bit(t["packed"], t["state"])
    results = []
    for use_kernels in (True, False):
        x = t["x"].detach().requires_grad_()
        with lora_engine.use_backend("triton"):
            y = lora_engine.linear_4bit(x, t["packed"], t["state"], t["bias"]) if use_kernels else x @ w.t() + t["bias"]
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        g.square().sum().backward()
        results.append(x.grad)
    assert results[1].abs().max() > 0
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4 * results[1].abs().max().item())

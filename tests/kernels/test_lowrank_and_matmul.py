"""Kernel-level checks of the launchers' variants that the layer tests do not all reach."""

import pytest
import torch

from lora_engine import reference
from lora_engine.format import packed_4bit
from lora_engine.kernels.lora_lowrank import lora_da, lora_down, lora_dy_pass
from lora_engine.kernels.lora_matmul import IN_LOOP_RANK_LIMIT, lora_matmul
from lora_engine.kernels.operands import Dropout
from lora_engine.testing import assert_close_3way

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _randn(*shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _three_way(name, fn_kernel, fn_torch, inputs, dtype):
    """Run fn_torch in float64 and in ``dtype`` on the same inputs; compare fn_kernel's result."""
    got = fn_kernel(*[t.to(dtype) for t in inputs])
    precise = fn_torch(*[t.double() for t in inputs])
    same = fn_torch(*[t.to(dtype) for t in inputs])
    atol = None
    if dtype == torch.float32:
        # cuBLAS's fp32 error on these short reductions can be a fraction of an ulp of the largest output, so
        # the 2x rule alone leaves no room for the kernel's different (split, atomic) summation order. A few
        # ulps still catch any real defect: one misplaced dropout element moves a result by ~1e5 ulps.
        atol = 8 * torch.finfo(torch.float32).eps * precise.abs().max().item()
    assert_close_3way(name, got, precise, same.to(got.dtype), atol=atol)


def test_dropout_mask_is_the_reference_mask(kernel_device):
    """The kernels keep exactly the elements the torch reference keeps (Philox bits compared exactly)."""
    m, k, p = 70, 48, 0.3
    ones = torch.ones(m, k, device=kernel_device)
    identity = torch.eye(k, device=kernel_device)  # drop(x)·I = drop(x): the mask itself, scaled
    kept = lora_down(ones, identity, Dropout(seed=1234, p=p, row_length=k))
    expected = reference.dropout_keep_mask(1234, m, k, p, kernel_device).float() / (1 - p)
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    assert 0.6 < (kept > 0).float().mean() < 0.8


def test_reference_mask_statistics_and_seeds():
    mask = reference.dropout_keep_mask(7, 300, 200, 0.1)
    assert abs(mask.float().mean().item() - 0.9) < 0.01
    assert not torch.equal(mask, reference.dropout_keep_mask(8, 300, 200, 0.1))
    assert torch.equal(mask, reference.dropout_keep_mask(7, 300, 200, 0.1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_m", [1, 3], ids=["one_pass", "split_m3"])
@pytest.mark.parametrize("rank", [5, 100], ids=["r5", "r100"])
def test_dy_pass_and_da(rank, split_m, dtype, kernel_device):
    m, n, k, s = 300, 45, 70, 0.75
    dy, lora_B, left, x = (_randn(*shape, device=kernel_device) for shape in ((m, n), (n, rank), (m, rank), (m, k)))
    left = left.to(dtype).float()  # the saved factor is fp32 but came from `dtype` products

    def dyb_db_torch(dy_, b_, left_):
        return torch.cat([dy_ @ b_, (s * dy_.t() @ left_)], dim=0)

    def dyb_db_kernel(dy_, b_, left_):
        dyb, db = lora_dy_pass(dy_, b_, left_.float(), s, split_m=split_m)
        return torch.cat([dyb, db], dim=0).to(dy_.dtype)

    _three_way("dyB|dB", dyb_db_kernel, dyb_db_torch, (dy, lora_B, left), dtype)

    keep = reference.dropout_keep_mask(99, m, k, 0.2, kernel_device)

    def da_torch(dyb_, x_):
        return s * dyb_.t() @ (x_ * keep.to(x_.dtype) / 0.8)

    def da_kernel(dyb_, x_):
        return lora_da(dyb_.float(), x_, s, Dropout(99, 0.2, k), split_m=split_m).to(x_.dtype)

    _three_way("dA", da_kernel, da_torch, (_randn(m, rank, device=kernel_device, seed=1), x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [3, IN_LOOP_RANK_LIMIT], ids=["r3", "rmax"])
def test_left_factor_in_loop_equals_separate_pass(rank, dtype, kernel_device):
    import bitsandbytes.functional as bnbF

    m, n, k = 33, 37, 100
    packed, state = bnbF.quantize_4bit(_randn(n, k, device=kernel_device, dtype=dtype), blocksize=64, quant_type="nf4")
    weight = packed_4bit(packed, state)
    x = _randn(m, k, device=kernel_device, dtype=dtype, seed=2)
    lora_A = _randn(rank, k, device=kernel_device, dtype=dtype, seed=3)
    lora_B = _randn(n, rank, device=kernel_device, dtype=dtype, seed=4)
    left_out = torch.full((m, rank), float("nan"), device=kernel_device)
    y_loop = lora_matmul(x, weight, weight_out_by_in=True, right=lora_B, down=lora_A.t(), left_out=left_out, scaling=0.5)
    left = lora_down(x, lora_A.t())
    y_pass = lora_matmul(x, weight, weight_out_by_in=True, right=lora_B, left=left, scaling=0.5)
    torch.testing.assert_close(left_out, left, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y_loop, y_pass, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_weight_both_orientations_and_wide_rank(dtype, kernel_device):
    m, n, k, rank = 40, 37, 100, 100  # rank > one rank tile: the epilogue loops over rank chunks
    w, x, dy = (_randn(*s, device=kernel_device, seed=i) for i, s in enumerate(((n, k), (m, k), (m, n))))
    left, right = _randn(m, rank, device=kernel_device, seed=5), _randn(n, rank, device=kernel_device, seed=6)
    x_t = x.t().contiguous().t()  # column-major activations

    def fwd_torch(x_, w_, left_, right_):
        return x_ @ w_.t() + 0.3 * (left_ @ right_.t())

    def fwd_kernel(x_, w_, left_, right_):
        return lora_matmul(x_, w_, weight_out_by_in=True, right=right_, left=left_.float(), scaling=0.3)

    _three_way("dense forward", fwd_kernel, fwd_torch, (x_t, w, left.to(dtype).float(), right), dtype)

    lora_A = _randn(rank, k, device=kernel_device, seed=7)

    def dx_torch(dy_, w_, dyb_, a_):
        return dy_ @ w_ + 0.3 * (dyb_ @ a_)

    def dx_kernel(dy_, w_, dyb_, a_):
        return lora_matmul(dy_, w_, weight_out_by_in=False, right=a_.t(), left=dyb_.float(), scaling=0.3)

    _three_way("dense input grad", dx_kernel, dx_torch, (dy, w, left.to(dtype).float(), lora_A), dtype)


def test_in_loop_rank_limit_is_enforced(kernel_device):
    x = torch.randn(4, 32, device=kernel_device)
    w = torch.randn(16, 32, device=kernel_device)
    too_wide = torch.randn(IN_LOOP_RANK_LIMIT + 1, 32, device=kernel_device)
    with pytest.raises(ValueError, match="rank <= 64"):
        lora_matmul(x, w, weight_out_by_in=True, right=torch.randn(16, IN_LOOP_RANK_LIMIT + 1), down=too_wide.t())
    with pytest.raises(ValueError, match=r"a is \[4, 32\] but the weight is \[16, 33\]"):
        lora_matmul(x, torch.randn(16, 33, device=kernel_device), weight_out_by_in=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [256, 150], ids=["k256-scale_per_row", "k150-straddling"])
def test_split_k_equals_one_pass(k, dtype, kernel_device):
    """Splitting K across programs (the small-M configuration) changes only the summation order."""
    import dataclasses

    import bitsandbytes.functional as bnbF

    from lora_engine.kernels.configs import matmul_config

    m, n, rank = 5, 70, 8
    packed, state = bnbF.quantize_4bit(_randn(n, k, device=kernel_device, dtype=dtype), blocksize=64, quant_type="fp4")
    weight = packed_4bit(packed, state)
    x, dy = _randn(m, k, device=kernel_device, dtype=dtype, seed=2), _randn(m, n, device=kernel_device, dtype=dtype)
    left = _randn(m, rank, device=kernel_device, seed=3)
    lora_B, lora_A = _randn(n, rank, device=kernel_device, dtype=dtype), _randn(rank, k, device=kernel_device, dtype=dtype)
    bias = _randn(n, device=kernel_device, dtype=dtype, seed=5)
    base = matmul_config(m, n, k, dtype)
    one, split = dataclasses.replace(base, split_k=1), dataclasses.replace(base, block_k=32, split_k=3)
    drop = Dropout(7, 0.25, k)
    for orientation, kwargs in (
        ("forward", dict(a=x, weight_out_by_in=True, right=lora_B, left=left, bias=bias)),
        ("input grad", dict(a=dy, weight_out_by_in=False, right=lora_A.t(), left=left, dropout=drop)),
    ):
        a = kwargs.pop("a")  # the input gradient reduces over W's rows (N plays K's part)
        y_one = lora_matmul(a, weight, scaling=0.7, config=one, **kwargs)
        y_split = lora_matmul(a, weight, scaling=0.7, config=split, **kwargs)
        assert y_split.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y_split, y_one, rtol=tol, atol=tol, msg=orientation)


def test_launch_geometry_is_worked_out_once_per_shape(kernel_device):
    """The launchers look their tiles, splits and grid up by shape: a repeated call recomputes nothing, a new shape
    gets its own entry."""
    from lora_engine.kernels import lora_lowrank as lowrank_module
    from lora_engine.kernels import lora_matmul as matmul_module

    a, weight, right, down = (_randn(*shape, device=kernel_device) for shape in ((5, 40), (24, 40), (24, 4), (40, 4)))
    dy, left = _randn(5, 24, device=kernel_device), _randn(5, 4, device=kernel_device)
    for name, cache, call in (
        ("lora_matmul", matmul_module._tiles,
         lambda m: lora_matmul(a[:m], weight, weight_out_by_in=True, right=right, down=down)),
        ("lora_dy_pass", lowrank_module._reduction_tiles, lambda m: lora_dy_pass(dy[:m], right, left[:m], 0.5)),
        ("lora_da", lowrank_module._reduction_tiles, lambda m: lora_da(left[:m], a[:m], 0.5)),
    ):  # fmt: skip
        first = call(5)
        before = cache.cache_info()
        torch.testing.assert_close(call(5), first, rtol=0, atol=0)
        after = cache.cache_info()
        assert (after.hits, after.misses) == (before.hits + 1, before.misses), name
        call(3)
        assert cache.cache_info().misses == after.misses + 1, f"{name}: another M must get its own geometry"

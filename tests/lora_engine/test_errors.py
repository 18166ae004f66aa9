"""Bad input fails with an error naming the problem and the sizes, on every backend; edge cases behave."""

import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_engine
from lora_engine import reference

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _operands(device="cpu", n=37, k=100, r=8, dtype=torch.float32):
    torch.manual_seed(0)
    packed, state = bnbF.quantize_4bit(torch.randn(n, k).to(device), blocksize=64, quant_type="nf4")
    return dict(
        x=torch.randn(5, k, device=device, dtype=dtype),
        weight=packed,
        quant_state=state,
        lora_A=torch.randn(r, k, device=device),
        lora_B=torch.randn(n, r, device=device),
        scaling=2.0,
    )


def _call(**ops):
    return lora_engine.lora_linear_4bit(
        ops.pop("x"), ops.pop("weight"), ops.pop("quant_state"), ops.pop("lora_A"), ops.pop("lora_B"), ops.pop("scaling"),
        **ops,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x=torch.randn(5, 99)), ValueError, r"in_features=100.*\(5, 99\)"),
        (dict(x=torch.randn(5, 100).double()), TypeError, "float64"),
        (dict(x=torch.randint(0, 3, (5, 100))), TypeError, "int64"),
        (dict(lora_A=torch.randn(8, 90)), ValueError, r"lora_A must be \(r, in_features\).*\(8, 90\)"),
        (dict(lora_B=torch.randn(37, 4)), ValueError, r"lora_B must be \(out_features, r\) = \(37, 8\).*\(37, 4\)"),
        (dict(lora_A=torch.randn(0, 100), lora_B=torch.randn(37, 0)), ValueError, "rank r must be >= 1"),
        (dict(bias=torch.randn(36)), ValueError, r"bias must be \(out_features,\) = \(37,\).*\(36,\)"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(scaling=float("nan")), TypeError, "scaling must be a finite"),
        (dict(lora_A=torch.randn(8, 100).int()), TypeError, "lora_A must be floating point"),
        (dict(quant_state=None), ValueError, "no quant_state"),
    ],
    ids=["in_features", "x_float64", "x_int", "A_shape", "B_shape", "rank_0", "bias_shape", "dropout_1", "scaling_nan",
         "A_int", "no_state"],
)  # fmt: skip
def test_bad_input_names_the_problem(backend, change, error, message):
    ops = {**_operands(), **change}
    with lora_engine.use_backend(backend), pytest.raises(error, match=message):
        _call(**ops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_format_is_rejected(backend):
    ops = _operands()
    state = ops["quant_state"]
    with lora_engine.use_backend(backend):
        state.quant_type = "int4"
        with pytest.raises(ValueError, match="unsupported 4-bit quant_type 'int4'"):
            _call(**_operands() | dict(quant_state=state))
        state.quant_type, state.blocksize = "nf4", 48
        with pytest.raises(ValueError, match="unsupported blocksize 48"):
            _call(**_operands() | dict(quant_state=state))
        state.blocksize = 64
        with pytest.raises(ValueError, match=r"holds 1848 bytes but a \[37, 100\] matrix packs into 1850"):
            _call(**_operands() | dict(weight=ops["weight"][:-2], quant_state=state))


def test_bad_quantization_arguments():
    with pytest.raises(ValueError, match="unsupported blocksize 100"):
        lora_engine.LoRALinear4bit(16, 16, blocksize=100)
    with pytest.raises(ValueError, match="unsupported quant_type 'int8'"):
        lora_engine.LoRALinear4bit(16, 16, quant_type="int8")
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        lora_engine.LoRALinear4bit(16, 16, r=0)


def test_device_mismatch_is_named():
    ops = _operands()
    ops["lora_B"] = ops["lora_B"].to("meta")
    with pytest.raises(ValueError, match="lora_B is on meta but x is on cpu"):
        _call(**ops)


DENSE_CALLS = {
    "lora_linear": lambda x, w: lora_engine.lora_linear(x, w, torch.randn(8, 100), torch.randn(37, 8), 1.0),
    "dora_linear": lambda x, w: lora_engine.dora_linear(x, w, torch.randn(8, 100), torch.randn(37, 8), torch.ones(37),
                                                        1.0),
    "ia3_linear": lambda x, w: lora_engine.ia3_linear(x, w, torch.ones(37), False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("function", DENSE_CALLS)
def test_dense_weight_must_be_a_frozen_matrix(function, backend):
    call, x = DENSE_CALLS[function], torch.randn(2, 100)
    with lora_engine.use_backend(backend):
        with pytest.raises(ValueError, match=f"{function} keeps the base weight frozen.*requires_grad"):
            call(x, torch.nn.Parameter(torch.randn(37, 100)))
        with pytest.raises(ValueError, match=rf"{function}: weight must be a 2-D tensor .*\(1, 37, 100\)"):
            call(x, torch.randn(1, 37, 100))
        with pytest.raises(ValueError, match=f"{function}: weight must be a 2-D tensor .*got list"):
            call(x, [[1.0] * 100] * 37)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_returns_empty_result(backend, kernel_device):
    ops = _operands(kernel_device if backend == "triton" else "cpu")
    x = torch.randn(0, 3, 100, device=ops["x"].device, requires_grad=True)
    lora_A = ops["lora_A"].requires_grad_()
    with lora_engine.use_backend(backend):
        y = lora_engine.lora_linear_4bit(x, ops["weight"], ops["quant_state"], lora_A, ops["lora_B"], 2.0)
    assert y.shape == (0, 3, 37)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(lora_A.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_the_reference(backend, kernel_device):
    ops = _operands(kernel_device if backend == "triton" else "cpu")
    x = ops["x"].clone()
    x[1, 3] = float("nan")
    x[3, 7] = float("inf")
    with lora_engine.use_backend(backend):
        y = _call(**ops | dict(x=x))
    expected = reference.lora_linear_4bit(x, ops["weight"], ops["quant_state"], ops["lora_A"], ops["lora_B"], 2.0)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    assert y[1].isnan().all() and y[0].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "seed", [2**64, 2**63, -1, 1.5, True, "7"], ids=["2**64", "2**63", "-1", "float", "bool", "str"]
)
def test_dropout_seed_out_of_range_is_named(backend, seed):
    message = r"dropout_seed must be an int in \[0, 2\*\*63\)"
    with lora_engine.use_backend(backend), pytest.raises(ValueError, match=message):
        _call(**_operands(), dropout_p=0.1, training=True, dropout_seed=seed)


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [0, 2**31 + 5, 2**40 + 3, 2**63 - 1])
def test_kernels_and_reference_drop_the_same_elements_over_the_seed_range(seed, kernel_device):
    """Seeds take the whole int64 range: both 32-bit halves of the Philox key reach the kernels as in the reference."""
    ops = _operands(kernel_device)
    ops["x"].requires_grad_()
    kwargs = dict(dropout_p=0.5, training=True, dropout_seed=seed)
    with lora_engine.use_backend("triton"):
        y = _call(**ops, **kwargs)
        (d_x,) = torch.autograd.grad(y.sum(), ops["x"])
    with lora_engine.use_backend("torch"):
        y_ref = _call(**ops, **kwargs)
        (d_x_ref,) = torch.autograd.grad(y_ref.sum(), ops["x"])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(d_x, d_x_ref, rtol=1e-4, atol=1e-3)
    other = dict(kwargs, dropout_seed=seed ^ (1 << 62))  # differs only in the high key word
    with lora_engine.use_backend("torch"):
        assert not torch.allclose(_call(**ops, **other), y_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_4bit_weight_is_refused(backend):
    """A float quant_storage lets the packed weight require grad; it would be listed as trainable and never
    trained, so the call refuses it, as for a dense base weight."""
    from lora_engine.format import quantize_weight

    weight = quantize_weight(torch.randn(37, 96), quant_storage=torch.float32).requires_grad_(True)
    ops = _operands(k=96) | {"weight": weight, "quant_state": weight.quant_state}
    with lora_engine.use_backend(backend), pytest.raises(ValueError, match="requires_grad"):
        _call(**ops)

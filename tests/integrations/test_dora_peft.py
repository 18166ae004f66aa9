"""PEFT DoRA layers (``use_dora=True``) over a 4-bit or a dense base, patched onto the kernels: the tiny Llama (4-bit
and dense) trains as stock PEFT does (A, B and the magnitude), with lora_dropout too, the report shows the layers
fused, the saved adapter is a stock PEFT DoRA adapter.

With dropout, stock PEFT and the kernels draw their masks from different generators. The stock model's dropout
modules are therefore replaced by ``SeededDropout``, which draws the kernels' mask from a seed taken from torch's
CPU generator as the fused forward takes it: with the same ``torch.manual_seed``, both runs drop the same elements
and stock PEFT's own DoRA code (its second base product of the dropped input, without the bias) is the reference.
"""

import math

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import lora_engine
from lora_engine import reference
from lora_engine.integrations.peft import FusedLoraLinear, FusedLoraLinear4bit
from lora_engine.testing import assert_close_3way

from .conftest import LR, assert_same_logits, assert_within, randomize_lora_B, train_steps, trainable_params

pytestmark = pytest.mark.interpreter

STEPS = 3
LORA_LAYERS = 14
# fp32, with the reasoning of test_tiny_llama_equivalence.py (same fp32 numbers, other summation order). The norm
# here comes from ‖W‖² + cross and quadratic rank-r terms instead of a dense W + s·B·A: a few ulps more per row,
# far below the bounds; a wrong norm term or a dropped gradient term moves results by O(1e-2) relative or more.
GRAD_TOL = 1e-4
LOSS_RTOL = 1e-5
LOGITS_TOL = 1e-4
WEIGHT_ATOL = 1e-2 * LR


def test_dora_training_matches_stock_peft(make_peft_llama, load_4bit, tokens, tmp_path, kernel_device):
    stock = make_peft_llama(device=kernel_device, use_dora=True)
    patched = make_peft_llama(device=kernel_device, use_dora=True)
    report = lora_engine.patch_peft_model(patched)
    assert report.num_patched == report.num_fused == LORA_LAYERS and not report.skipped, str(report)

    batches = [tokens(0, device=kernel_device)] * STEPS
    with lora_engine.use_backend("triton"):
        losses, grads = train_steps(patched, batches)
    stock_losses, stock_grads = train_steps(stock, batches)
    assert not report.fallbacks, str(report)

    assert grads.keys() == stock_grads.keys() and len(grads) == 3 * LORA_LAYERS
    assert sum("lora_magnitude_vector" in name for name in grads) == LORA_LAYERS
    for name, expected in stock_grads.items():
        assert expected.abs().max() > 0, f"{name}: degenerate gradient"
        assert_within(f"grad {name}", grads[name], expected, GRAD_TOL * expected.abs().max().item())
    for step, (loss, expected) in enumerate(zip(losses, stock_losses)):
        assert math.isfinite(loss) and abs(loss - expected) <= LOSS_RTOL * abs(expected), (step, losses, stock_losses)
    assert losses[-1] < losses[0], f"training did not reduce the loss: {losses}"
    stock_weights = trainable_params(stock)
    for name, param in trainable_params(patched).items():
        assert_within(f"weight {name}", param.detach(), stock_weights[name].detach(), WEIGHT_ATOL)

    patched.save_pretrained(tmp_path / "patched")
    stock.save_pretrained(tmp_path / "stock")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("patched", "stock"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    reloaded = PeftModel.from_pretrained(load_4bit(device=kernel_device), tmp_path / "patched")
    assert not any(isinstance(m, FusedLoraLinear4bit) for m in reloaded.modules())
    reloaded_weights = dict(reloaded.named_parameters())
    for name, param in trainable_params(patched).items():
        assert torch.equal(reloaded_weights[name], param), f"{name} changed on the way through save/load"
    assert_same_logits(patched, reloaded, tokens(100, device=kernel_device), LOGITS_TOL)


class SeededDropout(nn.Dropout):
    """nn.Dropout dropping what lora_engine's kernels drop: the reference's keep mask for a seed drawn from torch's
    CPU generator (one draw per call, as the fused forward draws it), kept elements scaled by 1 / (1 - p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        k = x.shape[-1]
        keep = reference.dropout_keep_mask(reference.draw_dropout_seed(), x.numel() // k, k, self.p, x.device)
        return x * (keep.reshape(x.shape).to(x.dtype) * (1.0 / (1.0 - self.p)))


def _seeded_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, dropout in module.lora_dropout.items():
                module.lora_dropout[name] = SeededDropout(dropout.p)


DROPOUT_STEPS = 2


def _assert_trains_as_stock_with_the_same_masks(patched: PeftModel, stock: PeftModel, batches: list) -> None:
    """Both trained (AdamW, a step per batch) from the same torch seed, the stock model's dropout seeded as the
    kernels draw theirs (``_seeded_dropout``): the same losses, first gradients and final weights, every weight
    changed."""
    before = {name: param.detach().clone() for name, param in trainable_params(patched).items()}
    torch.manual_seed(7)
    with lora_engine.use_backend("triton"):
        losses, grads = train_steps(patched, batches)
    torch.manual_seed(7)
    stock_losses, stock_grads = train_steps(stock, batches)
    assert grads.keys() == stock_grads.keys() and len(grads) == 3 * LORA_LAYERS
    for name, expected in stock_grads.items():
        assert expected.abs().max() > 0, f"{name}: degenerate gradient"
        assert_within(f"grad {name}", grads[name], expected, GRAD_TOL * expected.abs().max().item())
    for step, (loss, expected) in enumerate(zip(losses, stock_losses)):
        assert math.isfinite(loss) and abs(loss - expected) <= LOSS_RTOL * abs(expected), (step, losses, stock_losses)
    stock_weights = trainable_params(stock)
    for name, param in trainable_params(patched).items():
        assert_within(f"weight {name}", param.detach(), stock_weights[name].detach(), WEIGHT_ATOL)
        assert not torch.equal(param, before[name]), f"{name} did not change in training"


def test_dora_with_dropout_trains_as_stock_peft_with_the_same_mask(make_peft_llama, tokens, kernel_device):
    """lora_dropout in training runs the kernels (no fallback) and gives stock PEFT's losses, gradients and weights
    when both drop the same elements; a wrong (g − 1), a bias or a mask mix-up moves them far beyond the bounds."""
    stock = make_peft_llama(device=kernel_device, use_dora=True, lora_dropout=0.1)
    patched = make_peft_llama(device=kernel_device, use_dora=True, lora_dropout=0.1)
    _seeded_dropout(stock)
    report = lora_engine.patch_peft_model(patched)
    _assert_trains_as_stock_with_the_same_masks(patched, stock, [tokens(0, device=kernel_device)] * DROPOUT_STEPS)
    assert report.num_patched == report.num_fused == LORA_LAYERS and not report.fallbacks, str(report)


def _biased_dora_layer(device: str, base: str) -> PeftModel:
    """A PeftModel with DoRA (lora_dropout 0.2) over one NF4 or dense layer with a bias; equal calls give equal
    weights."""
    torch.manual_seed(0)
    if base == "nf4":
        layer = bnb.nn.Linear4bit(100, 37, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    else:
        layer = nn.Linear(100, 37)
    net = nn.Sequential(layer)
    net.is_loaded_in_4bit = base == "nf4"  # what transformers sets: PEFT then wraps the layer as lora.Linear4bit
    with torch.no_grad():
        net[0].bias.normal_()
    net = net.to(device)  # bitsandbytes quantizes on the move to a device
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.2)
    model = get_peft_model(net, config)
    randomize_lora_B(model, std=0.3)
    return model.train()


@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_dora_with_dropout_and_bias_matches_stock_peft(base, kernel_device):
    """One NF4 or dense layer with a bias (the Llama's have none): output and gradients of x, A, B and the
    magnitude."""
    stock, patched = (_biased_dora_layer(kernel_device, base) for _ in range(2))
    _seeded_dropout(stock)
    report = lora_engine.patch_peft_model(patched)
    fused = FusedLoraLinear4bit if base == "nf4" else FusedLoraLinear
    assert type(patched.base_model.model[0]) is fused, str(report)
    x = torch.randn(3, 5, 100, device=kernel_device)
    dy = torch.randn(3, 5, 37, device=kernel_device)
    results = []
    for model, backend in ((patched, "triton"), (stock, "auto")):
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        with lora_engine.use_backend(backend):
            y = model(xi)
        y.backward(dy)
        params = trainable_params(model)
        results.append({"y": y.detach(), "dx": xi.grad, **{name: p.grad for name, p in params.items()}})
    assert report.num_fused == 1 and not report.fallbacks, str(report)
    got, expected = results
    assert got.keys() == expected.keys() and len(got) == 5
    for name, value in expected.items():
        assert value.abs().max() > 0, f"{name}: degenerate"
        assert_within(name, got[name], value, GRAD_TOL * value.abs().max().item())


def test_dense_dora_under_autocast_reads_the_norm_from_the_parameter(kernel_device, monkeypatch):
    """fp16 autocast over an fp32 nn.Linear base (a model loaded in fp32, trained in mixed precision): the fused
    forward casts W for the call, as F.linear does, and reads ‖W‖² from the fp32 parameter through the per-weight
    cache (PEFT's norm is of the uncast W), not from a new fp32 copy of the cast one on every call. Three-way against
    stock PEFT: without autocast the precise result, under autocast the same-dtype one."""
    stock, patched = (_biased_dora_layer(kernel_device, "dense") for _ in range(2))
    _seeded_dropout(stock)
    lora_engine.patch_peft_model(patched)
    read = []
    cached = lora_engine.functional.row_norms_sq_cached
    monkeypatch.setattr(lora_engine.functional, "row_norms_sq_cached", lambda w: read.append(w) or cached(w))
    x = torch.randn(3, 5, 100, device=kernel_device)
    dy = torch.randn(3, 5, 37, device=kernel_device)
    results = {}
    for label, model, dtype in (("precise", stock, None), ("same", stock, torch.float16), ("got", patched,
                                                                                          torch.float16)):  # fmt: skip
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        with lora_engine.use_backend("triton"), torch.autocast(kernel_device, torch.float16, enabled=dtype is not None):
            y = model(xi)
        y.float().backward(dy)
        results[label] = {"y": y.detach(), "dx": xi.grad, **{n: p.grad for n, p in trainable_params(model).items()}}
        model.zero_grad(set_to_none=True)
    base_weight = patched.base_model.model[0].base_layer.weight
    assert base_weight.dtype == torch.float32 and read and all(w is base_weight for w in read), read
    got, precise, same = results["got"], results["precise"], results["same"]
    assert got.keys() == precise.keys() and len(got) == 5
    for name, value in got.items():
        assert value.dtype == same[name].dtype, name
        assert_close_3way(name, value, precise[name], same[name])


def _dense_dora_llama(path, device: str) -> PeftModel:
    """The tiny Llama in fp32, unquantized, with DoRA on all linear layers; equal calls give equal weights."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, lora_dropout=0.1)
    peft_model = get_peft_model(model, config)
    randomize_lora_B(peft_model)
    return peft_model


def test_dora_over_dense_llama_trains_as_stock_peft(tiny_llama_dir, tokens, tmp_path, kernel_device):
    """DoRA over nn.Linear bases (lora_dropout in training, both sides dropping the same elements): the kernels
    serve every layer, and losses, gradients, weights and the saved adapter are stock PEFT's."""
    stock, patched = (_dense_dora_llama(tiny_llama_dir, kernel_device) for _ in range(2))
    _seeded_dropout(stock)
    report = lora_engine.patch_peft_model(patched)
    assert all(type(m) is FusedLoraLinear for m in patched.modules() if isinstance(m, LoraLayer)), str(report)
    _assert_trains_as_stock_with_the_same_masks(patched, stock, [tokens(0, device=kernel_device)] * DROPOUT_STEPS)
    assert report.num_patched == report.num_fused == LORA_LAYERS and not report.fallbacks, str(report)

    patched.save_pretrained(tmp_path / "patched")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).to(kernel_device)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "patched")
    assert_same_logits(patched, reloaded, tokens(100, device=kernel_device), LOGITS_TOL)

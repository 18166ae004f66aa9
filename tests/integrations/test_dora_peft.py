"""PEFT DoRA layers (``use_dora=True``) over a 4-bit base, patched onto the kernels: the tiny 4-bit Llama trains
as stock PEFT does (A, B and the magnitude), the report shows the layers fused, the saved adapter is a stock PEFT
DoRA adapter; what the kernels do not serve (an nn.Linear base, dropout in training) falls back, reported."""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lora_engine
from lora_engine.integrations.peft import FusedLoraLinear4bit

from .conftest import LR, assert_within, train_steps, trainable_params

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
    ids = tokens(100, device=kernel_device)
    with torch.no_grad(), lora_engine.use_backend("triton"):
        logits = patched.eval()(input_ids=ids).logits
    with torch.no_grad():
        stock_logits = reloaded.eval()(input_ids=ids).logits
    assert_within("logits", logits, stock_logits, LOGITS_TOL * stock_logits.abs().max().item())


def test_dora_with_dropout_in_training_falls_back(make_peft_llama, tokens, kernel_device):
    model = make_peft_llama(device=kernel_device, use_dora=True, lora_dropout=0.1).eval()
    report = lora_engine.patch_peft_model(model)
    ids = tokens(1, batch=1, seq=4, device=kernel_device)
    with torch.no_grad(), lora_engine.use_backend("triton"):
        model.eval()(input_ids=ids)  # eval: no dropout, fused
        assert not report.fallbacks, str(report)
        model.train()(input_ids=ids)
    assert len(report.fallbacks) == LORA_LAYERS, str(report)
    assert "DoRA with lora_dropout in training" in str(report)


def test_dora_over_dense_base_falls_back(kernel_device):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(24, 37)), LoraConfig(r=4, target_modules=["0"], use_dora=True))
    report = lora_engine.patch_peft_model(model)
    assert "DoRA over an nn.Linear base" in str(report), str(report)

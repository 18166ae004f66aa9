"""PEFT IA3 layers patched onto the kernels: the tiny 4-bit Llama trains as stock PEFT does, the report shows the
layers fused, the saved adapter is a stock PEFT IA3 adapter, and what the kernels do not serve falls back."""

import math

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lora_engine
from lora_engine.integrations.peft import FusedIA3Linear, FusedIA3Linear4bit

from .conftest import assert_same_logits, LR, assert_within, train_steps, trainable_params

pytestmark = pytest.mark.interpreter

STEPS = 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FEEDFORWARD = ["up_proj", "down_proj"]  # input-scaled (prologue); the other five are output-scaled (epilogue)
IA3_LAYERS = 14  # 2 decoder layers x 7 projections
# fp32 tolerances, with the reasoning of test_tiny_llama_equivalence.py: the kernels and stock PEFT multiply the
# same fp32 numbers (the same decoded NF4 weight, the same fp32 IA3 vectors) and differ only in summation order,
# ~1e-6 relative per dot product, compounded over two decoder layers. A wrong side, a scale applied twice or a
# dropped gradient term moves the results by O(1) relative.
GRAD_TOL = 1e-4  # x max|grad| of each IA3 vector, first step
LOSS_RTOL = 1e-5
LOGITS_TOL = 1e-4  # x max|logits|
WEIGHT_ATOL = 1e-2 * LR  # AdamW moves each entry by ~LR a step: this is 100x below one step


def _make(load_4bit, device):
    model = load_4bit(device=device)
    peft_model = get_peft_model(model, IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts every vector at one; spread them so a scale on the wrong side shows
        for name, param in sorted(peft_model.named_parameters()):
            if "ia3_l" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
    return peft_model


def test_ia3_training_matches_stock_peft(load_4bit, tokens, tmp_path, kernel_device):
    stock = _make(load_4bit, kernel_device)
    patched = _make(load_4bit, kernel_device)
    report = lora_engine.patch_peft_model(patched)
    assert report.num_patched == report.num_fused == IA3_LAYERS and not report.skipped, str(report)
    assert str(report).startswith(f"lora_engine: {IA3_LAYERS}/{IA3_LAYERS} PEFT IA3 layers run the fused kernels")
    assert sum(isinstance(m, FusedIA3Linear4bit) for m in patched.modules()) == IA3_LAYERS

    batches = [tokens(0, device=kernel_device)] * STEPS
    with lora_engine.use_backend("triton"):
        losses, grads = train_steps(patched, batches)
    stock_losses, stock_grads = train_steps(stock, batches)
    assert not report.fallbacks, str(report)

    assert grads.keys() == stock_grads.keys() and len(grads) == IA3_LAYERS
    for name, expected in stock_grads.items():
        assert expected.abs().max() > 0, f"{name}: degenerate gradient"
        assert_within(f"grad {name}", grads[name], expected, GRAD_TOL * expected.abs().max().item())
    for step, (loss, expected) in enumerate(zip(losses, stock_losses)):
        assert math.isfinite(loss) and abs(loss - expected) <= LOSS_RTOL * abs(expected), (step, losses, stock_losses)
    assert losses[-1] < losses[0], f"training did not reduce the loss: {losses}"
    stock_weights = trainable_params(stock)
    for name, param in trainable_params(patched).items():
        assert_within(f"weight {name}", param.detach(), stock_weights[name].detach(), WEIGHT_ATOL)

    # The saved adapter is a stock PEFT IA3 adapter: same files, keys, shapes and dtypes as stock PEFT's.
    patched.save_pretrained(tmp_path / "patched")
    stock.save_pretrained(tmp_path / "stock")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("patched", "stock"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert sorted(p.name for p in (tmp_path / "patched").iterdir()) == sorted(
        p.name for p in (tmp_path / "stock").iterdir()
    )
    reloaded = PeftModel.from_pretrained(load_4bit(device=kernel_device), tmp_path / "patched")
    assert not any(isinstance(m, FusedIA3Linear4bit) for m in reloaded.modules())
    reloaded_weights = dict(reloaded.named_parameters())
    for name, param in trainable_params(patched).items():
        assert torch.equal(reloaded_weights[name], param), f"{name} changed on the way through save/load"
    assert_same_logits(patched, reloaded, tokens(100, device=kernel_device), LOGITS_TOL)


def test_ia3_fallbacks_are_reported(load_4bit, tokens, kernel_device):
    """Disabled, merged and several active adapters run PEFT's forward, and the report says so."""
    model = _make(load_4bit, kernel_device)
    report = lora_engine.patch_peft_model(model)
    ids = tokens(1, batch=1, seq=4, device=kernel_device)
    with torch.no_grad(), lora_engine.use_backend("triton"):
        fused = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert any("adapters disabled" in r for r in sum(report.fallbacks.values(), [])), str(report)
        assert not torch.allclose(fused, base)
        model.add_adapter("other", IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD))
        model.base_model.set_adapter(["default", "other"])
        several = model(input_ids=ids).logits  # "other" starts at ones: the same result as "default" alone
        assert any("several active adapters" in r for r in sum(report.fallbacks.values(), [])), str(report)
    torch.testing.assert_close(several, fused, rtol=1e-4, atol=1e-4)


def _dense_ia3(feedforward: bool):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 37), nn.ReLU(), nn.Linear(37, 11))
    config = IA3Config(target_modules=["0", "2"], feedforward_modules=["2"] if feedforward else [])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "ia3_l" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape))
    return model


@pytest.mark.parametrize("feedforward", [True, False], ids=["input_scaled", "output_scaled"])
def test_dense_ia3_matches_stock_peft(feedforward, kernel_device):
    stock, patched = _dense_ia3(feedforward), _dense_ia3(feedforward)
    report = lora_engine.patch_peft_model(patched)
    assert report.num_fused == 2 and sum(isinstance(m, FusedIA3Linear) for m in patched.modules()) == 2
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(1))
    outputs = []
    for model, backend in ((patched, "triton"), (stock, "torch")):
        with lora_engine.use_backend(backend):
            y = model(x)
        y.square().sum().backward()
        outputs.append((y, {n: p.grad for n, p in trainable_params(model).items()}))
    assert not report.fallbacks, str(report)
    (y, grads), (y_stock, stock_grads) = outputs
    torch.testing.assert_close(y, y_stock, rtol=1e-5, atol=1e-5)
    assert grads.keys() == stock_grads.keys() and len(grads) == 2
    for name, g in grads.items():
        torch.testing.assert_close(g, stock_grads[name], rtol=1e-4, atol=1e-4 * stock_grads[name].abs().max().item())


def test_unpatch_restores_peft_ia3_classes(load_4bit, kernel_device):
    model = _make(load_4bit, kernel_device)
    lora_engine.patch_peft_model(model)
    assert lora_engine.unpatch_peft_model(model) == IA3_LAYERS
    assert not any(isinstance(m, FusedIA3Linear4bit) for m in model.modules())
    assert "ia3.Linear4bit" in repr(model)


@pytest.mark.parametrize("vector_dtype", [torch.float32, torch.float16])
def test_fp16_input_gets_peft_dtype(load_4bit, kernel_device, vector_dtype):
    """PEFT's 4-bit IA3 layer upcasts a 16-bit input and returns float32 (outside autocast): so does the patch,
    also with the IA3 vectors themselves in float16."""
    stock, patched = _make(load_4bit, kernel_device), _make(load_4bit, kernel_device)
    for model in (stock, patched):
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.data = param.data.to(vector_dtype)
    lora_engine.patch_peft_model(patched)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(kernel_device, torch.float16)
    for name in ("self_attn.q_proj", "mlp.up_proj"):  # output-scaled, input-scaled
        layers = [dict(m.named_modules())[f"base_model.model.model.layers.0.{name}"] for m in (patched, stock)]
        with torch.no_grad(), lora_engine.use_backend("triton"):
            y = layers[0](x)
        with torch.no_grad():
            y_stock = layers[1](x)
        assert y.dtype == y_stock.dtype == torch.float32
        torch.testing.assert_close(y, y_stock, rtol=1e-5, atol=1e-5)

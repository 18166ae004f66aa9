"""Proof on the path users take: a Llama saved to disk, reloaded in NF4 with a BitsAndBytesConfig, PEFT LoRA
on all linear layers, trained with AdamW. Patched with lora_engine it trains as stock PEFT does, and the
adapter it saves is a stock PEFT adapter (it loads into an unpatched PeftModel and gives the same logits).
"""

import math

import pytest
import torch
from peft import PeftModel

import lora_engine
from lora_engine.integrations.peft import FusedLoraLinear4bit
from lora_engine.testing import assert_close_3way

from .conftest import LR, assert_within, train_steps, trainable_params

pytestmark = pytest.mark.interpreter

STEPS = 3
LORA_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down); all-linear leaves lm_head out

# fp32 tolerances. Stock PEFT and the kernels multiply the same fp32 numbers (bitsandbytes decodes the NF4
# weight to the same fp32 values the kernels decode), so they differ only in summation order: at most about
# K * eps = 96 * 1.2e-7 ~ 1e-5 relative per dot product, typically sqrt(K) * eps ~ 1e-6, compounded over two
# decoder layers forward and backward. The bounds below leave ~10x over that; a real defect (a wrong scaling,
# a dropped gradient term, a transposed factor, the wrong dropout scale) moves results by O(1) relative.
GRAD_TOL = 1e-4  # x max|grad| of each LoRA tensor, first step (before AdamW, whose update hides a scale error)
LOSS_RTOL = 1e-5
LOGITS_TOL = 1e-4  # x max|logits|
# AdamW moves every entry by about LR per step whatever the gradient's scale, so gradient noise of 1e-5 relative
# shows up as ~LR * 1e-5 in the weights (measured: ~1e-3 * LR, from the entries with the smallest gradients).
# 1e-2 * LR keeps 10x headroom and stays 100x below one step: a wrong update direction on any entry fails.
WEIGHT_ATOL = 1e-2 * LR


def test_training_matches_stock_peft(make_peft_llama, tokens, load_4bit, tmp_path, kernel_device):
    stock = make_peft_llama(device=kernel_device)
    patched = make_peft_llama(device=kernel_device)
    report = lora_engine.patch_peft_model(patched)
    assert report.num_patched == LORA_LAYERS and not report.fallbacks and not report.skipped, str(report)

    batches = [tokens(0, device=kernel_device)] * STEPS  # one batch again and again: the loss must fall
    stock_losses, stock_grads = train_steps(stock, batches)
    losses, grads = train_steps(patched, batches)

    assert grads.keys() == stock_grads.keys() and len(grads) == 2 * LORA_LAYERS
    for name, expected in stock_grads.items():
        assert expected.abs().max() > 0, f"{name}: degenerate gradient"
        assert_within(f"grad {name}", grads[name], expected, GRAD_TOL * expected.abs().max().item())
    for step, (loss, expected) in enumerate(zip(losses, stock_losses)):
        assert math.isfinite(loss) and abs(loss - expected) <= LOSS_RTOL * abs(expected), (step, losses, stock_losses)
    assert losses[-1] < losses[0] - 0.05, f"training did not reduce the loss: {losses}"
    stock_weights = trainable_params(stock)
    for name, param in trainable_params(patched).items():
        assert_within(f"weight {name}", param.detach(), stock_weights[name].detach(), WEIGHT_ATOL)

    # The adapter saved from the patched model is a stock PEFT adapter.
    patched.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(device=kernel_device), tmp_path / "adapter")
    assert not any(isinstance(m, FusedLoraLinear4bit) for m in reloaded.modules())
    reloaded_weights = dict(reloaded.named_parameters())
    for name, param in trainable_params(patched).items():
        assert torch.equal(reloaded_weights[name], param), f"{name} changed on the way through save/load"
    ids = tokens(100, device=kernel_device)
    patched.eval()
    reloaded.eval()
    with torch.no_grad():
        logits = patched(input_ids=ids).logits
        stock_logits = reloaded(input_ids=ids).logits
    assert_within("logits", logits, stock_logits, LOGITS_TOL * stock_logits.abs().max().item())


def test_training_with_dropout(make_peft_llama, tokens, kernel_device):
    """With lora_dropout > 0 the kernels draw their own masks (stock PEFT draws others, so there is nothing to
    compare bit for bit): the masks follow torch's seed, and training still lowers a finite loss."""
    model = make_peft_llama(lora_dropout=0.1, device=kernel_device)
    lora_engine.patch_peft_model(model)
    ids = tokens(0, device=kernel_device)
    model.train()
    with torch.no_grad():
        torch.manual_seed(10)
        first = model(input_ids=ids).logits
        torch.manual_seed(11)
        other_mask = model(input_ids=ids).logits
    assert not torch.equal(first, other_mask), "dropout had no effect in training mode"

    torch.manual_seed(10)
    losses, _ = train_steps(model, [ids] * 2)
    assert all(math.isfinite(loss) for loss in losses), losses
    # same torch seed, same masks: the first training loss is the loss of the logits seen above
    seen = torch.nn.functional.cross_entropy(first[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert losses[0] == pytest.approx(seen, rel=1e-6)
    assert losses[-1] < losses[0] - 0.05, f"training did not reduce the loss: {losses}"


@pytest.mark.gpu
def test_training_matches_stock_peft_bf16(make_peft_llama, tokens, load_4bit, tmp_path):
    """bf16 on a GPU, by the three-way rule: stock PEFT with fp32 compute is the precise result; the kernels may
    err at most twice as much as stock PEFT in bf16 does (plus one bf16 rounding of the result)."""
    precise = make_peft_llama(compute_dtype=torch.float32, device="cuda")
    stock = make_peft_llama(compute_dtype=torch.bfloat16, device="cuda")
    patched = make_peft_llama(compute_dtype=torch.bfloat16, device="cuda")
    report = lora_engine.patch_peft_model(patched)
    assert report.num_patched == LORA_LAYERS and not report.fallbacks, str(report)

    batches = [tokens(0, device="cuda")] * STEPS
    precise_losses, precise_grads = train_steps(precise, batches)
    stock_losses, stock_grads = train_steps(stock, batches)
    losses, grads = train_steps(patched, batches)
    bf16_eps = torch.finfo(torch.bfloat16).eps
    for step in range(STEPS):
        assert_close_3way(
            f"loss step {step}", torch.tensor([losses[step]]), torch.tensor([precise_losses[step]]),
            torch.tensor([stock_losses[step]]), atol=bf16_eps * abs(precise_losses[step]),
        )  # fmt: skip
    for name, expected in precise_grads.items():
        atol = bf16_eps * expected.abs().max().item()
        assert_close_3way(f"grad {name}", grads[name], expected, stock_grads[name], atol=atol)

    # The saved adapter in stock PEFT, on a bf16 base and on an fp32-compute base (the precise logits).
    patched.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(torch.bfloat16, "cuda"), tmp_path / "adapter")
    reloaded_precise = PeftModel.from_pretrained(load_4bit(torch.float32, "cuda"), tmp_path / "adapter")
    ids = tokens(100, device="cuda")
    with torch.no_grad():
        logits, stock_logits, precise_logits = (
            m.eval()(input_ids=ids).logits.float() for m in (patched, reloaded, reloaded_precise)
        )
    atol = bf16_eps * precise_logits.abs().max().item()
    assert_close_3way("logits", logits, precise_logits, stock_logits, atol=atol)

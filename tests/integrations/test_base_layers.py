"""Every 4-bit layer runs lora_engine's kernels, not only the ones with a LoRA adapter: LoRA on some projections,
prompt learning (Prefix Tuning), IA3 and a bare 4-bit model, each patched against stock, on the tiny 4-bit Llama
of conftest.py; state dicts, saved adapters, merge_and_unload and disable_adapter() as stock.

fp32 under the Triton interpreter (``use_backend("triton")``: the kernels really run). Stock and patched multiply
the same fp32 numbers (bitsandbytes and the kernels decode NF4 to the same values) and differ only in summation
order: at most K * eps = 96 * 1.2e-7 ~ 1e-5 relative per dot product, typically sqrt(K) * eps ~ 1e-6, compounded
over two decoder layers. The bounds leave ~10x over that; a wrong code, scale, bias or transposed weight moves
results by O(1) relative.
"""

import math
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model

import lora_engine
from lora_engine.integrations.peft import FusedLinear4bit, FusedLoraLinear4bit
from lora_engine.testing import describe_mismatch

from .conftest import LR, randomize_lora_B, train_steps

pytestmark = pytest.mark.interpreter

FOUR_BIT_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down); lm_head stays unquantized
STEPS = 3
REL_TOL = 1e-4  # x max|expected| for logits and gradients
LOSS_RTOL = 1e-5
# AdamW moves every entry by about LR per step whatever the gradient's scale: gradient noise of 1e-5 relative
# shows up as ~1e-3 * LR in the weights; 1e-2 * LR keeps 10x headroom and stays 100x below one step.
WEIGHT_ATOL = 1e-2 * LR


@pytest.fixture(autouse=True)
def _kernels():
    with lora_engine.use_backend("triton"):
        yield


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rel: float = REL_TOL) -> None:
    assert expected.abs().max() > 0, f"{name}: degenerate case, all zero"
    bound = rel * expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= bound, describe_mismatch(name, actual, expected, bound)


def _four_bit_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _lora_qv(load_4bit, device: str) -> torch.nn.Module:
    torch.manual_seed(1)
    model = get_peft_model(
        load_4bit(device=device), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    randomize_lora_B(model)
    return model


def test_lora_on_q_and_v_runs_every_4bit_layer_on_our_kernels(load_4bit, tokens, kernel_device, monkeypatch):
    stock, patched = _lora_qv(load_4bit, kernel_device), _lora_qv(load_4bit, kernel_device)
    report = lora_engine.patch_peft_model(patched)
    assert report.num_patched == report.num_fused == 4 and not report.fallbacks, str(report)
    assert len(report.base_patched) == 10 and report.num_base_fused == 10 and not report.base_fallbacks, str(report)
    assert len(report.lora_bases) == 4 and sorted(report.base_patched + report.lora_bases) == sorted(
        _four_bit_names(patched)
    )
    assert all(name.endswith(("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) for name in report.base_patched)
    assert sum(type(m) is FusedLinear4bit for m in patched.modules()) == FOUR_BIT_LAYERS
    headline = str(report).splitlines()[0]
    assert headline.startswith(
        "lora_engine: 4/4 PEFT LoRA layers run the fused kernels; 10/10 other 4-bit layers run lora_engine's 4-bit "
        "path (below 4096 tokens on CUDA that path keeps bitsandbytes' kernels, measured faster)"
    ), headline

    base_calls = []
    real = lora_engine.functional.linear_4bit
    monkeypatch.setattr(
        lora_engine.functional, "linear_4bit", lambda x, *a, **k: base_calls.append(1) or real(x, *a, **k)
    )
    batches = [tokens(0, device=kernel_device)] * STEPS  # one batch again and again: the loss must fall
    stock_losses, stock_grads = train_steps(stock, batches)
    losses, grads = train_steps(patched, batches)
    assert len(base_calls) == 10 * STEPS, "each of the 10 layers without an adapter runs lora_engine.linear_4bit"

    assert grads.keys() == stock_grads.keys() and len(grads) == 8
    for name, expected in stock_grads.items():
        _assert_close(f"grad {name}", grads[name], expected)
    for step, (loss, expected) in enumerate(zip(losses, stock_losses)):
        assert math.isfinite(loss) and abs(loss - expected) <= LOSS_RTOL * abs(expected), (step, losses, stock_losses)
    assert losses[-1] < losses[0] - 0.05, f"training did not reduce the loss: {losses}"
    stock_params = dict(stock.named_parameters())
    for name, param in patched.named_parameters():
        if param.requires_grad:
            err = (param.detach() - stock_params[name].detach()).abs().max().item()
            assert err <= WEIGHT_ATOL, describe_mismatch(f"weight {name}", param, stock_params[name], WEIGHT_ATOL)

    assert lora_engine.unpatch_peft_model(patched) == 4
    assert not any(type(m) in (FusedLinear4bit, FusedLoraLinear4bit) for m in patched.modules())


def _prefix_model(load_4bit, device: str) -> torch.nn.Module:
    torch.manual_seed(2)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return get_peft_model(load_4bit(device=device), config)


def test_prefix_tuning_is_patched_and_matches_stock(load_4bit, tokens, kernel_device):
    stock, patched = _prefix_model(load_4bit, kernel_device), _prefix_model(load_4bit, kernel_device)
    report = lora_engine.patch_peft_model(patched)  # no LoRA layer: the frozen 4-bit layers are patched
    assert not report.patched and report.num_base_fused == FOUR_BIT_LAYERS, str(report)
    assert str(report).startswith(f"lora_engine: {FOUR_BIT_LAYERS}/{FOUR_BIT_LAYERS} 4-bit layers run"), str(report)
    ids = tokens(3, device=kernel_device)
    results = []
    for model in (stock, patched):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (stock_logits, stock_grads), (logits, grads) = results
    _assert_close("logits", logits, stock_logits)
    assert grads.keys() == stock_grads.keys() and grads, "the prefix must be trainable"
    for name, expected in stock_grads.items():
        _assert_close(f"grad {name}", grads[name], expected)


def _ia3_model(load_4bit, device: str) -> torch.nn.Module:
    torch.manual_seed(3)
    model = get_peft_model(load_4bit(device=device), IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():  # IA3 starts at ones (the identity), which would hide a vector that is not applied
        for name, param in sorted(model.named_parameters()):
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def test_ia3_model_runs_every_4bit_layer_on_our_kernels_and_matches_stock(load_4bit, tokens, kernel_device):
    stock, patched = _ia3_model(load_4bit, kernel_device), _ia3_model(load_4bit, kernel_device)
    report = lora_engine.patch_peft_model(patched)
    ia3_layers = 2 * 3  # PEFT's IA3 targets for Llama: k_proj, v_proj and down_proj of each decoder layer
    assert report.kinds == {"IA3"} and report.num_fused == len(report.patched) == ia3_layers, str(report)
    assert len(report.lora_bases) == ia3_layers, "the IA3 layers' bases are patched for PEFT's fallback forward"
    assert report.num_base_fused == FOUR_BIT_LAYERS - ia3_layers, str(report)
    ids = tokens(4, device=kernel_device)
    with torch.no_grad():
        logits, stock_logits = (m.eval()(input_ids=ids).logits for m in (patched, stock))
        no_ia3 = _logits_without_adapter(patched, ids)
    _assert_close("logits", logits, stock_logits)
    assert (logits - no_ia3).abs().max() > 1e-2 * no_ia3.abs().max(), "the IA3 vectors changed nothing"


def _logits_without_adapter(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with model.disable_adapter():
        return model(input_ids=ids).logits


def test_bare_4bit_model_through_patch_model(load_4bit, tokens, kernel_device):
    stock, patched = load_4bit(device=kernel_device), load_4bit(device=kernel_device)
    before = {name: type(m) for name, m in patched.named_modules()}
    report = lora_engine.patch_model(patched)
    assert report.num_base_fused == FOUR_BIT_LAYERS and not report.patched, str(report)
    assert repr(patched) == repr(stock), "the module repr keeps bitsandbytes' names"
    ids = tokens(5, device=kernel_device)
    with torch.no_grad():
        _assert_close("logits", patched(input_ids=ids).logits, stock(input_ids=ids).logits)
    assert lora_engine.unpatch_model(patched) == FOUR_BIT_LAYERS
    assert {name: type(m) for name, m in patched.named_modules()} == before
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids).logits, stock(input_ids=ids).logits)
    with pytest.raises(ValueError, match="patch_model found no PEFT LoRA or IA3 layers and no bitsandbytes 4-bit"):
        lora_engine.patch_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_state_dict_saved_adapter_merge_and_disable_as_stock(load_4bit, tokens, kernel_device, tmp_path):
    stock, patched = _lora_qv(load_4bit, kernel_device), _lora_qv(load_4bit, kernel_device)
    state = _state(patched)
    lora_engine.patch_peft_model(patched)
    ids = tokens(6, device=kernel_device)
    with torch.no_grad():
        patched.eval()(input_ids=ids)  # a forward sets the compute dtype: it must not touch the state either
    after = patched.state_dict()
    assert list(after) == list(state), "state-dict keys changed"
    for name, value in state.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), f"{name} changed"

    stock.save_pretrained(tmp_path / "stock")
    patched.save_pretrained(tmp_path / "patched")
    assert _files(tmp_path / "patched") == _files(tmp_path / "stock"), "the saved adapter differs"

    with torch.no_grad():
        stock.eval()
        with patched.disable_adapter(), stock.disable_adapter():
            disabled, stock_disabled = patched(input_ids=ids).logits, stock(input_ids=ids).logits
        _assert_close("disable_adapter logits", disabled, stock_disabled)
        enabled = patched(input_ids=ids).logits
        assert (enabled - disabled).abs().max() > 1e-3 * disabled.abs().max(), "disable_adapter changed nothing"
        merged, stock_merged = patched.merge_and_unload(), stock.merge_and_unload()
        assert sum(type(m) is FusedLinear4bit for m in merged.modules()) == FOUR_BIT_LAYERS
        _assert_close("merged logits", merged(input_ids=ids).logits, stock_merged(input_ids=ids).logits)
        assert lora_engine.unpatch_model(merged) == FOUR_BIT_LAYERS
        merged_state, stock_state = merged.state_dict(), stock_merged.state_dict()
        assert list(merged_state) == list(stock_state)
        assert all(torch.equal(merged_state[k], stock_state[k]) for k in stock_state), "merge wrote other weights"

"""PEFT's mixed batches (``model(..., adapter_names=[...])``) through the mixed-batch kernels, against stock PEFT on
the tiny 4-bit Llama: two LoRA adapters of different ranks and scalings and base-only rows in one batch give the
same logits and gradients, with no fallback; cases the kernels do not serve run PEFT's forward and are reported.
"""

import logging

import pytest
import torch
from peft import LoraConfig
from torch._dynamo.testing import CompileCounterWithBackend

import lora_engine
from lora_engine import dispatch
from lora_engine.testing import describe_mismatch

pytestmark = pytest.mark.interpreter

NAMES = ["default", "second", "__base__", "second"]  # sample b runs through adapter NAMES[b]
# fp32 both ways on the same fp32 numbers (bitsandbytes decodes NF4 to the values the kernels decode): only the
# summation order differs, ~K·eps ~ 1e-5 relative per product at most, over two decoder layers. As in
# test_tiny_llama_equivalence.py, 1e-4 x max|logits| leaves ~10x; a wrong adapter, rank or scaling on any row moves
# its logits by O(1e-2) relative or more (checked below: the rows differ between adapters by far more).
LOGITS_TOL = 1e-4


def _two_adapter_llama(make_peft_llama, device: str, **second):
    """The tiny 4-bit Llama with adapter "default" (r=8, scaling 2) and "second" (r=4, scaling 4, or ``second``)."""
    model = make_peft_llama(device=device)
    torch.manual_seed(2)
    config = dict(r=4, lora_alpha=16, target_modules="all-linear", **second)
    model.add_adapter("second", LoraConfig(**config))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name and ".second." in name:  # trained-looking B for the second adapter too
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def _assert_logits(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    bound = LOGITS_TOL * expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= bound, describe_mismatch(name, actual, expected, bound)


def test_mixed_batch_matches_stock_peft(make_peft_llama, tokens, kernel_device, monkeypatch):
    stock = _two_adapter_llama(make_peft_llama, kernel_device)
    patched = _two_adapter_llama(make_peft_llama, kernel_device)
    report = lora_engine.patch_peft_model(patched)
    assert not report.fallbacks, str(report)
    ids = tokens(3, batch=len(NAMES), seq=9)
    calls = []
    original = lora_engine.functional.multi_lora_linear_4bit
    monkeypatch.setattr(
        lora_engine.functional, "multi_lora_linear_4bit", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    with torch.no_grad():
        logits = patched(input_ids=ids, adapter_names=NAMES).logits
        expected = stock(input_ids=ids, adapter_names=NAMES).logits
    assert len(calls) == 14, "every LoRA layer (2 decoder layers x 7 projections) runs the mixed-batch kernels"
    assert not report.fallbacks, str(report)
    _assert_logits("mixed-batch logits", logits, expected)
    # the rows really differ by adapter: each matches stock PEFT with that one adapter (or none) active
    with torch.no_grad():
        for b, name in enumerate(NAMES):
            single = stock(input_ids=ids[b : b + 1], adapter_names=[name]).logits
            _assert_logits(f"row {b} ({name})", logits[b : b + 1], single)
        default_only = stock(input_ids=ids, adapter_names=["default"] * len(NAMES)).logits
    assert (default_only[1] - expected[1]).abs().max() > 100 * LOGITS_TOL * expected.abs().max()
    assert (default_only[2] - expected[2]).abs().max() > 100 * LOGITS_TOL * expected.abs().max()


def test_compiled_mixed_batch_matches_eager(make_peft_llama, tokens, kernel_device):
    """The serving recipe of the README with mixed batches: the base model's forward compiled whole (fullgraph=True),
    PeftModel.forward registering the adapter_names hooks around it. The graph holds one mixed-batch op per LoRA
    layer and gives eager's logits; other names trace again (Dynamo guards on the hooks) rather than run stale ones.
    (Compiling the PeftModel itself breaks the graph in PEFT's own code: registering a hook cannot be traced.)"""
    patched = _two_adapter_llama(make_peft_llama, kernel_device)
    report = lora_engine.patch_peft_model(patched)
    ids = tokens(3, batch=len(NAMES), seq=9)
    other = ["second", "__base__", "default", "default"]
    base = patched.get_base_model()
    # Dynamo's capture is what this test is about: the op under AOT autograd and Inductor is covered by
    # tests/integrations/test_compile.py, and Inductor on this model would double the test's time
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected = [patched(input_ids=ids, adapter_names=names).logits for names in (NAMES, other)]
            base.forward = torch.compile(base.forward, backend=counter, fullgraph=True)
            logits = [patched(input_ids=ids, adapter_names=names).logits for names in (NAMES, other)]
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 2, "one graph per list of names"
    for graph in counter.graphs:
        assert graph.code.count("lora_engine.multi_lora_linear_fwd") == 14, "every LoRA layer runs the mixed op"
    assert not report.fallbacks, str(report)
    for names, got, want in zip((NAMES, other), logits, expected):
        _assert_logits(f"compiled {names}", got, want)
    assert (expected[0] - expected[1]).abs().max() > 100 * LOGITS_TOL * expected[0].abs().max()


# gradients: fp32 both ways, only the summation order differs (as LOGITS_TOL), over the backward of two layers
GRAD_TOL = 1e-4  # x max|grad| of each LoRA tensor


def test_mixed_batch_gradients_match_stock_peft(make_peft_llama, tokens, kernel_device):
    """With autograd recording (PEFT allows adapter_names in eval mode) every LoRA tensor gets stock PEFT's gradient:
    each adapter's from its own rows only."""
    stock = _two_adapter_llama(make_peft_llama, kernel_device)
    patched = _two_adapter_llama(make_peft_llama, kernel_device)
    report = lora_engine.patch_peft_model(patched)
    ids = tokens(8, batch=len(NAMES), seq=6)
    for model in (stock, patched):
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)  # both adapters' factors, not only the active one's
        model(input_ids=ids, adapter_names=NAMES, labels=ids).loss.backward()
    assert not report.fallbacks, str(report)
    stock_params = dict(stock.named_parameters())
    checked = 0
    for name, param in patched.named_parameters():
        if not param.requires_grad:
            continue
        expected = stock_params[name].grad
        assert expected.abs().max() > 0, f"{name}: degenerate gradient"
        bound = GRAD_TOL * expected.abs().max().item()
        assert (param.grad - expected).abs().max().item() <= bound, describe_mismatch(name, param.grad, expected, bound)
        checked += 1
    assert checked == 4 * 14  # A and B of two adapters in 14 layers


def test_generate_with_adapter_names(make_peft_llama, tokens, kernel_device):
    stock = _two_adapter_llama(make_peft_llama, kernel_device)
    patched = _two_adapter_llama(make_peft_llama, kernel_device)
    report = lora_engine.patch_peft_model(patched)
    prompt = tokens(4, batch=3, seq=5)
    names = NAMES[:3]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = patched.generate(input_ids=prompt, adapter_names=names, output_logits=True,
                               return_dict_in_generate=True, **kwargs)  # fmt: skip
        out_stock = stock.generate(input_ids=prompt, adapter_names=names, output_logits=True,
                                   return_dict_in_generate=True, **kwargs)  # fmt: skip
    assert torch.equal(out.sequences, out_stock.sequences)
    for step, (a, b) in enumerate(zip(out.logits, out_stock.logits)):
        _assert_logits(f"generate step {step}", a, b)
    assert not report.fallbacks, str(report)


FALLBACKS = {
    # name: (config of the second adapter, reason, whether PEFT's forward raises)
    "dora": (dict(use_dora=True), "mixed-batch adapter_names with LoRA variant", "DoRA"),
    "lora_bias": (dict(lora_bias=True), "mixed-batch adapter_names: lora_bias ('second')", None),
}


@pytest.mark.parametrize("case", FALLBACKS, ids=list(FALLBACKS))
def test_unserved_mixed_batches_fall_back_and_are_reported(case, make_peft_llama, tokens, kernel_device, monkeypatch,
                                                          caplog):  # fmt: skip
    second, reason, raises = FALLBACKS[case]
    monkeypatch.setattr(dispatch, "_reported", set())
    stock = _two_adapter_llama(make_peft_llama, kernel_device, **second)
    patched = _two_adapter_llama(make_peft_llama, kernel_device, **second)
    report = lora_engine.patch_peft_model(patched)
    ids = tokens(5, batch=len(NAMES), seq=6)
    with caplog.at_level(logging.WARNING, logger="lora_engine"), torch.no_grad():
        if raises is not None:  # PEFT refuses it: the fallback runs PEFT's forward, which raises PEFT's error
            with pytest.raises(ValueError, match=raises):
                patched(input_ids=ids, adapter_names=NAMES)
        else:
            logits = patched(input_ids=ids, adapter_names=NAMES).logits
            expected = stock(input_ids=ids, adapter_names=NAMES).logits
            _assert_logits(case, logits, expected)
    assert report.fallbacks and all(any(reason in r for r in reasons) for reasons in report.fallbacks.values()), str(
        report
    )
    assert sum(reason in record.getMessage() for record in caplog.records) == 1


def test_mixed_batch_with_grouped_projections(make_peft_llama, tokens, kernel_device):
    """Grouped q/k/v and gate/up leave a mixed batch to the layers (PEFT's hook passes adapter_names to each)."""
    stock = _two_adapter_llama(make_peft_llama, kernel_device)
    patched = _two_adapter_llama(make_peft_llama, kernel_device)
    report = lora_engine.patch_peft_model(patched, group_projections=True)
    assert report.grouped, str(report)
    ids = tokens(6, batch=len(NAMES), seq=7)
    with torch.no_grad():
        _assert_logits("grouped", patched(input_ids=ids, adapter_names=NAMES).logits,
                       stock(input_ids=ids, adapter_names=NAMES).logits)  # fmt: skip
    assert not report.fallbacks, str(report)
    assert all("pre-hooks" in "; ".join(reasons) for reasons in report.group_fallbacks.values()), str(report)

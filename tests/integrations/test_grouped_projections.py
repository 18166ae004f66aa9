"""``patch_peft_model(model, group_projections=True)`` on the tiny 4-bit Llama: q/k/v and gate/up computed together
train exactly as stock PEFT does (losses, gradients, AdamW weights), the groups really run, draw LoRA dropout per
member in training, fall back where they must (torch.compile), take plain 4-bit members, keep PEFT's state dict and
adapter, unpatch, and keep each thread's precomputed outputs to itself.
"""

import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

import lora_engine
import lora_engine.integrations.grouped as grouped_integration
import lora_engine.integrations.peft as peft_integration
import lora_engine.kernels.dequantize
from lora_engine.grouped import GroupedLoRA4bitFunction
from lora_engine.integrations.peft import FusedLinear4bit, FusedLoraLinear4bit

from .conftest import assert_within, randomize_lora_B, train_steps
from .test_tiny_llama_equivalence import GRAD_TOL, LOGITS_TOL, LOSS_RTOL, STEPS, WEIGHT_ATOL

pytestmark = pytest.mark.interpreter

GROUPS = 4  # 2 decoder layers x (q/k/v, gate/up)


@pytest.fixture
def group_calls(monkeypatch):
    """Counts of grouped computations: all of them, and those through the autograd function (training)."""
    calls = {"groups": 0, "autograd": 0}
    compute = grouped_integration.grouped_lora_linear_4bit
    apply = GroupedLoRA4bitFunction.apply

    def counting_compute(*args, **kwargs):
        calls["groups"] += 1
        return compute(*args, **kwargs)

    def counting_apply(*args, **kwargs):
        calls["autograd"] += 1
        return apply(*args, **kwargs)

    monkeypatch.setattr(grouped_integration, "grouped_lora_linear_4bit", counting_compute)
    monkeypatch.setattr(GroupedLoRA4bitFunction, "apply", counting_apply)
    return calls


def _modules(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def test_training_matches_stock_peft(make_peft_llama, tokens, load_4bit, tmp_path, kernel_device, group_calls):
    stock = make_peft_llama(device=kernel_device)
    patched = make_peft_llama(device=kernel_device)
    with lora_engine.use_backend("triton"):
        report = lora_engine.patch_peft_model(patched, group_projections=True)
        assert len(report.grouped) == GROUPS and not report.group_skipped and not report.fallbacks, str(report)
        assert "; 4 projection groups fused (q/k/v, gate/up)" in report.summary()
        assert all(len(members) in (2, 3) for members in report.grouped.values())
        assert patched.state_dict().keys() == stock.state_dict().keys()

        batches = [tokens(0, device=kernel_device)] * STEPS
        stock_losses, stock_grads = train_steps(stock, batches)
        losses, grads = train_steps(patched, batches)
    assert group_calls["autograd"] == GROUPS * STEPS, group_calls  # every group, every step, through autograd
    assert not report.group_fallbacks, str(report)

    for name, expected in stock_grads.items():
        assert expected.abs().max() > 0, f"{name}: degenerate gradient"
        assert_within(f"grad {name}", grads[name], expected, GRAD_TOL * expected.abs().max().item())
    for step, (loss, expected) in enumerate(zip(losses, stock_losses)):
        assert abs(loss - expected) <= LOSS_RTOL * abs(expected), (step, losses, stock_losses)
    stock_weights = dict(stock.named_parameters())
    for name, param in patched.named_parameters():
        if param.requires_grad:
            assert_within(f"weight {name}", param.detach(), stock_weights[name].detach(), WEIGHT_ATOL)

    # The saved adapter is a stock PEFT adapter: reloaded into an unpatched model it holds the same weights and
    # gives the same logits.
    patched.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(device=kernel_device), tmp_path / "adapter").eval()
    reloaded_weights = dict(reloaded.named_parameters())
    for name, param in patched.named_parameters():
        if param.requires_grad:
            assert torch.equal(reloaded_weights[name], param), f"{name} changed on the way through save/load"
    ids = tokens(100, device=kernel_device)
    with torch.no_grad(), lora_engine.use_backend("triton"):
        logits = patched.eval()(input_ids=ids).logits
        expected = reloaded(input_ids=ids).logits
    assert_within("logits", logits, expected, LOGITS_TOL * expected.abs().max().item())

    # Unpatching gives every module transformers', PEFT's and bitsandbytes' class back.
    lora_engine.unpatch_peft_model(patched)
    for module in _modules(patched, LlamaAttention) + _modules(patched, LlamaMLP):
        assert type(module) in (LlamaAttention, LlamaMLP) and not hasattr(module, "_lora_engine_group")
    assert not _modules(patched, FusedLoraLinear4bit) and not _modules(patched, FusedLinear4bit)
    assert patched.state_dict().keys() == stock.state_dict().keys()


def test_grouping_is_opt_in(make_peft_llama, tokens, kernel_device, group_calls):
    model = make_peft_llama(device=kernel_device)
    report = lora_engine.patch_peft_model(model)
    assert not report.grouped and "projection groups" not in report.summary()
    assert all(type(m) is LlamaAttention for m in _modules(model, LlamaAttention))
    # patching again with grouping, then without, takes the groups away again
    assert len(lora_engine.patch_peft_model(model, group_projections=True).grouped) == GROUPS
    lora_engine.patch_peft_model(model)
    assert all(type(m) is LlamaMLP for m in _modules(model, LlamaMLP))
    with torch.no_grad():
        model(input_ids=tokens(0, device=kernel_device))
    assert group_calls["groups"] == 0


def test_lora_dropout_in_training(make_peft_llama, tokens, kernel_device, group_calls):
    """With LoRA dropout the groups still run in training, each member drawing its own mask; seeds come in the
    per-layer order, so under one torch seed grouped and per-layer training give the same losses and weights."""
    batches = [tokens(s, device=kernel_device) for s in range(STEPS)]
    models, runs = {}, {}
    for grouping in (True, False):
        model = models[grouping] = make_peft_llama(lora_dropout=0.25, device=kernel_device)
        with lora_engine.use_backend("triton"):
            report = lora_engine.patch_peft_model(model, group_projections=grouping)
            torch.manual_seed(7)
            runs[grouping] = train_steps(model, batches)
        if grouping:
            assert group_calls["autograd"] == GROUPS * STEPS and not report.group_fallbacks, str(report)
            assert not report.fallbacks, str(report)
    (grouped_losses, grouped_grads), (losses, grads) = runs[True], runs[False]
    assert grouped_losses == pytest.approx(losses, rel=LOSS_RTOL)
    for name, grad in grads.items():
        assert_within(f"grad {name}", grouped_grads[name], grad, GRAD_TOL * grad.abs().max().item())
    per_layer = dict(models[False].named_parameters())
    for name, param in models[True].named_parameters():
        if param.requires_grad:
            assert_within(f"weight {name}", param, per_layer[name], WEIGHT_ATOL)
    # the masks are drawn: another torch seed gives another first loss
    model = make_peft_llama(lora_dropout=0.25, device=kernel_device)
    lora_engine.patch_peft_model(model, group_projections=True)
    with lora_engine.use_backend("triton"), torch.no_grad():
        torch.manual_seed(8)
        other = model.train()(input_ids=batches[0], labels=batches[0]).loss.item()
    assert other != pytest.approx(losses[0], rel=LOSS_RTOL)


def test_lora_dropout_is_off_in_eval(make_peft_llama, tokens, kernel_device, group_calls):
    """A model trained with LoRA dropout, evaluated: the groups run without dropping anything, as PEFT's dropout
    modules in eval mode do."""
    stock = make_peft_llama(lora_dropout=0.25, device=kernel_device)
    model = make_peft_llama(lora_dropout=0.25, device=kernel_device)
    lora_engine.patch_peft_model(model, group_projections=True)
    ids = tokens(0, device=kernel_device)
    with lora_engine.use_backend("triton"), torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
        stock_logits = stock.eval()(input_ids=ids).logits
    assert group_calls["groups"] == GROUPS
    assert_within("logits", logits, stock_logits, LOGITS_TOL * stock_logits.abs().max().item())


def test_dora_layers_keep_their_own_forward(make_peft_llama, tokens, kernel_device, group_calls):
    """DoRA scales each layer's output row by row: its projections are not grouped, and give what stock PEFT gives."""
    stock = make_peft_llama(device=kernel_device, use_dora=True)
    model = make_peft_llama(device=kernel_device, use_dora=True)
    report = lora_engine.patch_peft_model(model, group_projections=True)
    ids = tokens(0, device=kernel_device)
    with lora_engine.use_backend("triton"), torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
        stock_logits = stock.eval()(input_ids=ids).logits
    assert group_calls["groups"] == 0
    assert len(report.group_fallbacks) == GROUPS, str(report)
    assert all("DoRA" in "; ".join(reasons) for reasons in report.group_fallbacks.values()), str(report)
    assert_within("logits", logits, stock_logits, LOGITS_TOL * stock_logits.abs().max().item())


def test_plain_4bit_members(load_4bit, tokens, kernel_device, group_calls):
    """LoRA on q and v only: k joins its group as a 4-bit layer without LoRA, gate/up group without any LoRA."""

    def make():
        model = load_4bit(device=kernel_device)
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        randomize_lora_B(model)
        return model

    stock, patched = make(), make()
    with lora_engine.use_backend("triton"):
        report = lora_engine.patch_peft_model(patched, group_projections=True)
        assert len(report.grouped) == GROUPS and not report.group_skipped, str(report)
        attention = _modules(patched, LlamaAttention)[0]
        assert type(attention.k_proj) is FusedLinear4bit and type(attention.q_proj) is FusedLoraLinear4bit
        ids = tokens(0, device=kernel_device)
        stock_losses, stock_grads = train_steps(stock, [ids])
        losses, grads = train_steps(patched, [ids])
    assert group_calls["autograd"] == GROUPS, group_calls
    assert abs(losses[0] - stock_losses[0]) <= LOSS_RTOL * abs(stock_losses[0]), (losses, stock_losses)
    for name, expected in stock_grads.items():
        assert expected.abs().max() > 0, f"{name}: degenerate gradient"
        assert_within(f"grad {name}", grads[name], expected, GRAD_TOL * expected.abs().max().item())


def test_threads_see_their_own_outputs(make_peft_llama, tokens, kernel_device, group_calls, monkeypatch):
    """Two threads run the same grouped model at once on different inputs, interleaved on purpose: thread 0 stops
    at its first projection (its attention block's outputs set) until thread 1 has set its own and stopped at its
    first projection; thread 0 then finishes, then thread 1. The precomputed outputs live in a context variable,
    so each thread's projections find their own; with one shared table thread 1's outputs would hide thread 0's
    (found for another input object, so thread 0's layers would compute again, and miss the count below)."""
    hits, errors, results = [], [], {}
    thread_index = {}
    zero_waiting, one_waiting, zero_done = threading.Event(), threading.Event(), threading.Event()
    lookup = peft_integration._precomputed

    def scheduled_lookup(*args, **kwargs):
        index = thread_index.get(threading.get_ident())
        if index == 0 and not one_waiting.is_set():
            zero_waiting.set()
            one_waiting.wait(timeout=60)
        elif index == 1 and not one_waiting.is_set():
            one_waiting.set()
            zero_done.wait(timeout=60)
        found = lookup(*args, **kwargs)
        hits.append(found is not None)
        return found

    monkeypatch.setattr(peft_integration, "_precomputed", scheduled_lookup)
    model = make_peft_llama(device=kernel_device).eval()
    lora_engine.patch_peft_model(model, group_projections=True)
    inputs = [tokens(seed, device=kernel_device) for seed in (1, 2)]
    with torch.no_grad():
        expected = [model(input_ids=ids).logits for ids in inputs]
    assert not torch.allclose(expected[0], expected[1])
    hits.clear()

    def run(index):
        thread_index[threading.get_ident()] = index
        try:
            with torch.no_grad():
                results[index] = model(input_ids=inputs[index]).logits
        except Exception as error:  # surfaced in the main thread
            errors.append(error)
        finally:
            if index == 0:
                zero_done.set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    threads[0].start()
    zero_waiting.wait(timeout=60)  # thread 0 is held at its first projection
    threads[1].start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert zero_waiting.is_set() and one_waiting.is_set() and zero_done.is_set()
    for index in range(2):
        torch.testing.assert_close(results[index], expected[index], rtol=0, atol=0)
    assert group_calls["groups"] == GROUPS * 4
    # q, k, v, gate, up of both layers, two forwards: each projection served from its own thread's group (o_proj
    # and down_proj, called inside the grouped forwards, look and find nothing)
    assert (sum(hits), len(hits)) == (5 * 2 * 2, 7 * 2 * 2), f"{sum(hits)} of {len(hits)} lookups found an output"


def test_not_grouped_under_compile(make_peft_llama, kernel_device, group_calls):
    """Under torch.compile the module runs its projections per layer (their custom ops compile, no graph break)."""
    model = make_peft_llama(device=kernel_device).eval()
    lora_engine.patch_peft_model(model, group_projections=True)
    mlp = _modules(model, LlamaMLP)[0]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    with torch.no_grad():
        eager = mlp(x)
        assert group_calls["groups"] == 1
        compiled = torch.compile(mlp, backend="eager", fullgraph=True)(x)
    assert group_calls["groups"] == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


def test_forced_path_runs_per_layer(make_peft_llama, tokens, kernel_device, group_calls):
    """A path forced for benchmarking or testing is what every projection runs: the groups step aside, reported."""
    model = make_peft_llama(device=kernel_device).eval()
    report = lora_engine.patch_peft_model(model, group_projections=True)
    ids = tokens(0, device=kernel_device)
    with lora_engine.use_backend("triton"), torch.no_grad():
        with lora_engine.force_path("dequant"):
            forced = model(input_ids=ids).logits
        assert group_calls["groups"] == 0
        assert all(reasons == ["the 'dequant' path is forced (lora_engine.force_path)"]
                   for reasons in report.group_fallbacks.values()) and len(report.group_fallbacks) == GROUPS
        grouped = model(input_ids=ids).logits
    assert group_calls["groups"] == GROUPS
    assert_within("logits", grouped, forced, LOGITS_TOL * forced.abs().max().item())


def test_other_classes_are_named_not_grouped(make_peft_llama):
    """A module holding gate/up projections that is not one of the families' own classes keeps per-layer calls,
    and the report names it with why."""

    class CustomMLP(LlamaMLP):
        pass

    model = make_peft_llama()
    mlp = _modules(model, LlamaMLP)[1]
    mlp.__class__ = CustomMLP
    report = lora_engine.patch_peft_model(model, group_projections=True)
    name = next(name for name, module in model.named_modules() if module is mlp)
    assert len(report.grouped) == GROUPS - 1 and name not in report.grouped, str(report)
    assert (
        list(report.group_skipped) == [name]
        and "CustomMLP is not a Llama, Mistral or Qwen2 MLP block" in (report.group_skipped[name])
    )
    assert "3 projection groups fused (q/k/v, gate/up), 1 not grouped" in report.summary()
    assert f"  projections not grouped:\n    {name}: " in report.summary()
    assert type(mlp) is CustomMLP


@pytest.mark.parametrize("family, lora_bias", [("qwen2", False), ("mistral", False), ("qwen2", True)],
                         ids=["qwen2", "mistral", "qwen2-lora_bias"])  # fmt: skip
def test_other_families(family, lora_bias, tmp_path, tokens, kernel_device, group_calls):
    """Qwen2 (biases on q/k/v: the grouped bias path) and Mistral train one step as stock PEFT does, grouped; also
    with ``lora_bias`` (lora_B's bias joins the member's bias)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    from .conftest import TINY_LLAMA, load_4bit_llama

    config = (Qwen2Config if family == "qwen2" else MistralConfig)(**TINY_LLAMA)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)

    def make():
        model = load_4bit_llama(tmp_path, device=kernel_device)
        torch.manual_seed(1)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_bias=lora_bias)
        model = get_peft_model(model, config)
        randomize_lora_B(model)
        return model

    stock, patched = make(), make()
    attention = next(m for m in patched.modules() if type(m).__name__.endswith("Attention"))
    assert (attention.q_proj.get_base_layer().bias is not None) == (family == "qwen2")
    with lora_engine.use_backend("triton"):
        report = lora_engine.patch_peft_model(patched, group_projections=True)
        assert len(report.grouped) == GROUPS and not report.group_skipped, str(report)
        ids = tokens(0, device=kernel_device)
        stock_losses, stock_grads = train_steps(stock, [ids])
        losses, grads = train_steps(patched, [ids])
    assert group_calls["autograd"] == GROUPS and not report.fallbacks, (group_calls, str(report))
    assert sum(name.endswith("lora_B.default.bias") for name in grads) == (14 if lora_bias else 0), list(grads)
    assert abs(losses[0] - stock_losses[0]) <= LOSS_RTOL * abs(stock_losses[0]), (losses, stock_losses)
    for name, expected in stock_grads.items():
        assert expected.abs().max() > 0, f"{name}: degenerate gradient"
        assert_within(f"grad {name}", grads[name], expected, GRAD_TOL * expected.abs().max().item())


def test_gradient_checkpointing(make_peft_llama, tokens, kernel_device, group_calls):
    """Gradient checkpointing runs each decoder layer's forward again in the backward: the groups recompute."""
    stock, patched = make_peft_llama(device=kernel_device), make_peft_llama(device=kernel_device)
    for model in (stock, patched):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with lora_engine.use_backend("triton"):
        lora_engine.patch_peft_model(patched, group_projections=True)
        ids = tokens(0, device=kernel_device)
        _, stock_grads = train_steps(stock, [ids])
        _, grads = train_steps(patched, [ids])
    assert group_calls["autograd"] == 2 * GROUPS, group_calls  # forward, and again in the backward
    for name, expected in stock_grads.items():
        assert_within(f"grad {name}", grads[name], expected, GRAD_TOL * expected.abs().max().item())


def test_gradient_checkpointing_redraws_the_same_dropout(make_peft_llama, tokens, kernel_device, group_calls):
    """The recomputed forward must draw the masks of the first one (checkpointing restores torch's RNG state):
    with LoRA dropout, checkpointed and plain training give the same gradients under one torch seed."""
    plain, checkpointed = (make_peft_llama(lora_dropout=0.25, device=kernel_device) for _ in range(2))
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = tokens(0, device=kernel_device)
    grads = {}
    with lora_engine.use_backend("triton"):
        for name, model in (("plain", plain), ("checkpointed", checkpointed)):
            lora_engine.patch_peft_model(model, group_projections=True)
            torch.manual_seed(3)
            grads[name] = train_steps(model, [ids])[1]
    assert group_calls["autograd"] == 3 * GROUPS, group_calls  # plain once, checkpointed twice
    for name, expected in grads["plain"].items():
        assert_within(f"grad {name}", grads["checkpointed"][name], expected, GRAD_TOL * expected.abs().max().item())

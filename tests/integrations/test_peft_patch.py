"""patch_peft_model: PEFT's LoRA layers run the fused kernels, keep PEFT's modules and state, and fall back to
PEFT's forward (reported once) for what the kernels do not cover."""

import logging
from contextlib import nullcontext

import bitsandbytes as bnb
import pytest
import torch
from lora_engine.kernels import runtime
from peft import (
    AdaLoraConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    get_layer_status,
    get_model_status,
    get_peft_model,
)
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
from peft.tuners.lora.layer import Linear as PeftLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

import lora_engine
from lora_engine import dispatch, reference
from lora_engine.integrations import peft as integration
from lora_engine.integrations.peft import FusedLinear4bit, FusedLoraLinear, FusedLoraLinear4bit, register_fused_layers
from lora_engine.testing import assert_close_3way, describe_mismatch

pytestmark = pytest.mark.interpreter

TARGETS = ["q", "k", "out"]


class Net(nn.Module):
    """Two 4-bit projections with odd shapes (NF4 nested with a bias; FP4 plain without, K odd) and a dense one."""

    is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT then wraps Linear4bit as lora.Linear4bit

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.q = bnb.nn.Linear4bit(100, 37, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        self.k = bnb.nn.Linear4bit(37, 45, bias=False, compute_dtype=dtype, quant_type="fp4", compress_statistics=False)
        self.out = nn.Linear(45, 29, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.k(torch.relu(self.q(x)))))


def _net(device: str, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net(dtype).to(device)  # bitsandbytes quantizes on the move to a device


def _randomize_lora_B(model: nn.Module, seed: int = 0) -> None:
    """Fresh lora_B is zero, which hides every mistake in the LoRA term; give it values as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _peft_net(device: str, dtype: torch.dtype = torch.float32, patch: bool = False, **lora) -> PeftModel:
    """A PeftModel over ``Net``; equal arguments give equal weights."""
    torch.manual_seed(1)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS, **lora})
    model = get_peft_model(_net(device, dtype), config)
    _randomize_lora_B(model)
    if patch:
        lora_engine.patch_peft_model(model)
    return model


def _layers(model: PeftModel) -> dict[str, nn.Module]:
    net = model.base_model.model
    return {name: getattr(net, name) for name in TARGETS}


def _count_base_calls(monkeypatch) -> list[tuple]:
    """Record the calls of ``lora_engine.functional.linear_4bit`` (the 4-bit layers without a fused adapter)."""
    calls = []
    real = lora_engine.functional.linear_4bit

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(lora_engine.functional, "linear_4bit", counting)
    return calls


def _restore_bnb_bases(model: nn.Module) -> None:
    """Only the 4-bit layers back to bitsandbytes' class (the LoRA layers stay patched)."""
    for module in model.modules():
        if type(module) is FusedLinear4bit:
            module.__class__ = bnb.nn.Linear4bit


# fp32: stock and patched multiply the same fp32 numbers (bitsandbytes and the kernels decode the same values) and
# differ only in summation order, at most K * eps ~ 100 * 1.2e-7 relative per dot product for K <= 100; a wrong
# code, scale or bias is off by O(1).
FP32_TOL = 2e-5


def _assert_close_fp32(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    bound = FP32_TOL * expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= bound, describe_mismatch(name, actual, expected, bound)


def _x(device: str, dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(3, 5, 100, generator=gen).to(device, dtype).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# The fused forward against the definition, layer by layer (three-way rule)


def _reference_layer(layer, x, keep, p, dtype):
    """The layer's math in ``dtype``: x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b, W decoded exactly from its 4-bit codes."""
    base = layer.get_base_layer()
    weight = base.weight
    w = reference.dequantize_4bit(weight, weight.quant_state) if hasattr(weight, "quant_state") else weight.float()
    a = layer.lora_A["default"].weight.detach().to(dtype).requires_grad_()
    b = layer.lora_B["default"].weight.detach().to(dtype).requires_grad_()
    xr = x.detach().to(dtype).requires_grad_()
    x_lora = xr if keep is None else xr * keep.to(dtype) / (1 - p)
    y = xr @ w.to(dtype).t() + layer.scaling["default"] * ((x_lora @ a.t()) @ b.t())
    if base.bias is not None:
        y = y + base.bias.detach().to(dtype)
    return y, (xr, a, b)


LAYER_CASES = [
    (layer, dtype, rslora, p)
    for layer in TARGETS
    for dtype in (torch.float32, torch.float16)
    for rslora, p in ((False, 0.0), (True, 0.1), (False, 0.1), (True, 0.0))
]


@pytest.mark.parametrize(
    "layer_name, dtype, rslora, p",
    LAYER_CASES,
    ids=[f"{n}-{str(d)[6:]}-{'rslora' if r else 'lora'}-p{p}" for n, d, r, p in LAYER_CASES],
)
def test_fused_layer_matches_definition(layer_name, dtype, rslora, p, kernel_device):
    model = _peft_net(kernel_device, dtype, patch=True, use_rslora=rslora, lora_dropout=p)
    model.train()
    layer = _layers(model)[layer_name]
    assert type(layer) in (FusedLoraLinear4bit, FusedLoraLinear)
    expected_scaling = 16 / 8**0.5 if rslora else 16 / 8
    assert layer.scaling["default"] == pytest.approx(expected_scaling)

    in_features = layer.get_base_layer().in_features
    x = _x(kernel_device, dtype)[..., :in_features].contiguous().requires_grad_()
    keep = None
    if p:
        torch.manual_seed(7)  # the layer draws its dropout seed from torch's generator
        seed = reference.draw_dropout_seed()
        keep = reference.dropout_keep_mask(seed, 15, in_features, p, x.device).reshape(x.shape)
    torch.manual_seed(7)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(kernel_device, dtype)
    y.backward(dy)
    got = (y, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    assert y.dtype == dtype and got[2].dtype == got[3].dtype == torch.float32  # PEFT keeps adapters in fp32

    results = {}
    for label, ref_dtype in (("precise", torch.float64), ("same", dtype)):
        yr, leaves = _reference_layer(layer, x, keep, p, ref_dtype)
        yr.backward(dy.to(ref_dtype))
        results[label] = (yr, *(t.grad for t in leaves))
    for i, name in enumerate(("y", "dx", "dA", "dB")):
        precise, same = results["precise"][i], results["same"][i]
        # fp32 LoRA gradients from fp16 activations: allow fp16's rounding of the result, as the kernel tests do
        atol = 1e-3 * precise.abs().max().item() if dtype == torch.float16 and name in ("dA", "dB") else None
        assert_close_3way(f"{layer_name} {name}", got[i], precise, same, atol=atol)


@pytest.mark.parametrize("lora", [{}, {"lora_bias": True}], ids=["lora", "lora_bias"])
def test_patched_model_matches_stock_peft_and_keeps_its_state(lora, kernel_device):
    """Also with ``lora_bias`` (a trained bias on lora_B, over bases with and without a bias of their own)."""
    stock, patched = _peft_net(kernel_device, **lora), _peft_net(kernel_device, **lora)
    report = lora_engine.patch_peft_model(patched)
    assert report.num_patched == 3 and not report.fallbacks and not report.skipped, str(report)
    assert "3/3 PEFT LoRA layers run the fused kernels" in str(report)

    layers = _layers(patched)
    assert isinstance(layers["q"], PeftLinear4bit) and type(layers["q"]) is FusedLoraLinear4bit
    assert isinstance(layers["out"], PeftLinear) and type(layers["out"]) is FusedLoraLinear
    assert all("Linear" in type(layer).__name__ for layer in layers.values())  # PEFT's all-linear reads names
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert list(patched.state_dict()) == list(stock.state_dict())

    trained = _assert_gradients_as_stock(patched, stock, kernel_device)
    assert sum(name.endswith("lora_B.default.bias") for name in trained) == (3 if lora else 0), trained


def _assert_gradients_as_stock(patched: PeftModel, stock: PeftModel, device: str) -> list[str]:
    """One forward and backward of both: the same output and gradients (x and every trained parameter, none zero),
    each forward after the same torch seed (PEFT's dropout modules draw their masks from it). Returns the names of
    the trained parameters."""
    x = _x(device, requires_grad=True)
    x_stock = x.detach().clone().requires_grad_()
    torch.manual_seed(11)
    y = patched(x)
    torch.manual_seed(11)
    y_stock = stock(x_stock)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(device)
    y.backward(dy)
    y_stock.backward(dy)
    # fp32 both ways on the same fp32 numbers: only the summation order differs (K <= 100)
    torch.testing.assert_close(y, y_stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_stock.grad, rtol=1e-5, atol=1e-5)
    stock_params = dict(stock.named_parameters())
    trained = {name: param for name, param in patched.named_parameters() if param.requires_grad}
    for name, param in trained.items():
        assert param.grad.abs().max() > 0, name
        torch.testing.assert_close(param.grad, stock_params[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    return list(trained)


def test_torch_backend_runs_the_reference_through_the_patch(kernel_device):
    stock, patched = _peft_net(kernel_device), _peft_net(kernel_device, patch=True)
    x = _x(kernel_device)
    with lora_engine.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(patched(x), stock(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Fallbacks: PEFT's forward for that call, the layer listed in the report, one log line per reason


def _two_adapters(model: PeftModel) -> None:
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_lora_B(model, seed=5)
    model.base_model.set_adapter(["default", "other"])


FALLBACKS = {
    # name: (LoraConfig kwargs, change made after patching, forward kwargs, reason)
    # DoRA: fused over 4-bit and nn.Linear bases, with dropout in training too (test_dora_peft.py)
    # mixed-batch adapter_names: the kernels over 4-bit bases, fallbacks in test_multi_lora_peft.py
    "merged": ({}, lambda m: m.merge_adapter(), {}, "adapter merged into the base weight"),
    "disabled": ({}, "disable", {}, "adapters disabled"),
}


@pytest.mark.parametrize("lora_bias", [False, True], ids=["lora", "lora_bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_several_active_adapters_run_as_one_adapter_of_their_summed_rank(lora_bias, dropout, kernel_device):
    """PEFT adds up the terms of every active adapter (ranks 8 and 4 here, ``lora_bias`` on one): one fused call,
    each factor getting its own gradient. Without dropout over the stacked factors; where one adapter draws dropout
    in training (a mask per adapter), each left factor comes from the adapter's own dropout module and lora_A, as
    PEFT draws them, beside the others: PEFT's output and gradients under the same seed."""
    stock, patched = (_peft_net(kernel_device, lora_bias=lora_bias, lora_dropout=dropout) for _ in range(2))
    for model in (stock, patched):
        _two_adapters(model)
        model.train()
    report = lora_engine.patch_peft_model(patched)
    # the call's rank: lora_A's rows (stacked factors), or the left factor's columns (made by the modules)
    function, rank_of = ("lowrank_linear_4bit", lambda left: left.shape[-1]) if dropout else (
        "lora_linear_4bit", lambda lora_A: lora_A.shape[0])  # fmt: skip
    ranks = []
    real = getattr(lora_engine.functional, function)

    def recording(x, weight, quant_state, factor, *args, **kwargs):
        ranks.append(rank_of(factor))
        return real(x, weight, quant_state, factor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(lora_engine.functional, function, recording)
        trained = _assert_gradients_as_stock(patched, stock, kernel_device)
    assert not report.fallbacks and ranks == [8 + 4, 8 + 4], (str(report), ranks)
    assert sum(".other." in name for name in trained) == sum(".default." in name for name in trained) - lora_bias * 3


@pytest.mark.parametrize("case", FALLBACKS, ids=list(FALLBACKS))
def test_fallback_runs_peft_forward_and_is_reported_once(case, monkeypatch, caplog, kernel_device):
    config, change, forward_kwargs, reason = FALLBACKS[case]
    monkeypatch.setattr(dispatch, "_reported", set())  # report_once remembers reasons process-wide
    stock, patched = _peft_net(kernel_device, **config), _peft_net(kernel_device, **config)
    report = lora_engine.patch_peft_model(patched)
    for model in (stock, patched):
        if callable(change):
            change(model)
        model.eval()
    x = _x(kernel_device)
    base_calls = _count_base_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lora_engine"), torch.no_grad():
        for _ in range(2):
            with patched.disable_adapter() if change == "disable" else nullcontext():
                y = patched(x, **forward_kwargs)
            with stock.disable_adapter() if change == "disable" else nullcontext():
                y_stock = stock(x, **forward_kwargs)
            # PEFT's forward calls base_layer(x), which runs lora_engine's 4-bit path: the same fp32 products
            # summed in another order
            _assert_close_fp32("fallback", y, y_stock)
        assert base_calls, "PEFT's forward did not run the 4-bit bases through lora_engine"
        _restore_bnb_bases(patched)  # with bitsandbytes' own bases the fallback is PEFT's forward bit for bit
        with patched.disable_adapter() if change == "disable" else nullcontext():
            y = patched(x, **forward_kwargs)
        assert torch.equal(y, y_stock), "a fallback must be exactly PEFT's forward"
    assert set(report.fallbacks) == {f"base_model.model.{name}" for name in TARGETS}, str(report)
    assert all(reason in reasons for reasons in report.fallbacks.values()), str(report)
    assert reason in str(report)
    logged = [r for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]


def test_fallback_when_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(runtime, "_settled", False)  # as if the kernels were compiled for a GPU: none for CPU tensors
    monkeypatch.setattr(dispatch, "_reported", set())
    stock, patched = _peft_net("cpu"), _peft_net("cpu")
    report = lora_engine.patch_peft_model(patched)
    assert len(report.fallbacks) == 3 and "Triton cannot run on cpu tensors" in str(report), str(report)
    assert report.num_patched == 3 and report.num_fused == 0
    assert str(report).startswith(
        "lora_engine: 0/3 PEFT LoRA layers run the fused kernels; 3 fall back to PEFT's forward\n"
    ), str(report)
    x = _x("cpu")
    with torch.no_grad():
        assert torch.equal(patched(x), stock(x))


@pytest.mark.skipif(not runtime.interpreter_active(), reason="CPU tensors run the kernels only in the interpreter")
def test_fallback_for_bf16_in_the_interpreter(monkeypatch):
    """The interpreter computes bf16 on raw bits: under bf16 autocast on CPU the layers run PEFT's forward."""
    monkeypatch.setattr(dispatch, "_reported", set())
    stock, patched = _peft_net("cpu"), _peft_net("cpu")
    report = lora_engine.patch_peft_model(patched)
    x = _x("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.equal(patched(x), stock(x))
    assert len(report.fallbacks) == 3 and "bf16 in the Triton interpreter" in str(report), str(report)


class ConvAndEmbedding(nn.Module):
    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(11, 24)
        self.c_attn = Conv1D(20, 24)  # GPT-2's transposed linear: weight is [in, out]
        self.out = nn.Linear(20, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.c_attn(self.emb(ids)))


def test_layers_the_kernels_do_not_cover_are_left_alone(kernel_device):
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["emb", "c_attn", "out"], fan_in_fan_out=True)
    stock = get_peft_model(ConvAndEmbedding().to(kernel_device), config)
    _randomize_lora_B(stock)
    patched = get_peft_model(ConvAndEmbedding().to(kernel_device), config)
    patched.load_state_dict(stock.state_dict())
    report = lora_engine.patch_peft_model(patched)
    assert report.patched == ["base_model.model.out"], str(report)
    assert set(report.skipped) == {"base_model.model.emb", "base_model.model.c_attn"}
    assert "fan_in_fan_out" in report.skipped["base_model.model.c_attn"]
    assert "not covered" in report.skipped["base_model.model.emb"]
    assert type(patched.base_model.model.c_attn) is PeftLinear
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0)).to(kernel_device)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids), stock(ids), rtol=1e-5, atol=1e-5)


def test_report_headline_counts_only_layers_that_run_the_kernels(kernel_device):
    patched = _peft_net(kernel_device).eval()
    patched.base_model.model.out.base_layer.weight.requires_grad_(True)  # the kernels take a frozen base weight
    report = lora_engine.patch_peft_model(patched)
    assert report.num_patched == 3 and report.num_fused == 2, str(report)
    assert list(report.fallbacks) == ["base_model.model.out"], str(report)
    headline = str(report).splitlines()[0]
    assert headline == "lora_engine: 2/3 PEFT LoRA layers run the fused kernels; 1 falls back to PEFT's forward"
    x = _x(kernel_device)
    with torch.no_grad(), lora_engine.use_backend("torch"):
        with patched.disable_adapter():
            patched(x)  # a fallback met at call time counts as well
        assert report.num_fused == 0
        assert str(report).startswith("lora_engine: 0/3 PEFT LoRA layers run the torch reference (backend 'torch'); 3")


# ---------------------------------------------------------------------------------------------------------------
# Stacked tuners (PeftMixedModel): a LoRA layer whose base layer is another tuner layer runs PEFT's forward


class MLP(nn.Module):
    """Two dense layers, the model PEFT's own mixed-adapter tests use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


MLP_TARGETS = ["lin0", "lin1"]
STACKS = {
    # name: (adapter configs, applied in this order; whether the LoRA layers can run the kernels)
    "loha_then_lora": (lambda: (LoHaConfig(target_modules=MLP_TARGETS, init_weights=False), _lora()), False),
    "lokr_then_lora": (lambda: (LoKrConfig(target_modules=MLP_TARGETS, init_weights=False), _lora()), False),
    "adalora_then_lora": (
        lambda: (AdaLoraConfig(target_modules=MLP_TARGETS, init_lora_weights=False, total_step=1), _lora()),
        False,
    ),
    "lora_then_loha": (lambda: (_lora(), LoHaConfig(target_modules=MLP_TARGETS, init_weights=False)), True),
}


def _lora() -> LoraConfig:
    return LoraConfig(target_modules=MLP_TARGETS, init_lora_weights=False)  # random lora_B: a visible delta


def _stacked(stack: str, device: str) -> nn.Module:
    """A PeftMixedModel over ``MLP`` with both adapters of ``STACKS[stack]`` active; equal stacks, equal weights."""
    torch.manual_seed(0)
    first, second = STACKS[stack][0]()
    model = get_peft_model(MLP().to(device), first, adapter_name="first", mixed=True)
    model.add_adapter("second", second)
    model.set_adapter(["first", "second"])
    return model.eval()


@pytest.mark.parametrize("stack", STACKS)
def test_lora_stacked_on_another_tuner_runs_peft_forward(stack, kernel_device):
    stock, patched = _stacked(stack, kernel_device), _stacked(stack, kernel_device)
    report = lora_engine.patch_peft_model(patched)
    lora_layers = [name for name, m in patched.named_modules() if isinstance(m, PeftLinear)]
    assert report.patched == lora_layers and len(lora_layers) == 2, str(report)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(3)).to(kernel_device)
    with torch.no_grad():
        y, y_stock = patched(x), stock(x)
    if STACKS[stack][1]:  # LoRA under the other tuner reads nn.Linear directly: the kernels run
        assert report.num_fused == 2 and not report.fallbacks, str(report)
        torch.testing.assert_close(y, y_stock, rtol=1e-5, atol=1e-5)
        return
    assert torch.equal(y, y_stock), f"max |patched - stock| = {(y - y_stock).abs().max().item():.3g}"
    assert set(report.fallbacks) == set(lora_layers) and report.num_fused == 0, str(report)
    assert all("stacked on another PEFT tuner layer" in reasons[0] for reasons in report.fallbacks.values())
    total = report.num_patched + len(report.skipped)  # AdaLoRA's own layers are LoRA layers the patch skips
    assert f"0/{total} PEFT LoRA layers run the fused kernels; 2 fall back to PEFT's forward" in str(report)

    report.fallbacks.clear()  # the same check runs on every call
    with torch.no_grad():
        assert torch.equal(patched(x), y_stock)
    assert set(report.fallbacks) == set(lora_layers), str(report)


class Doubled(nn.Module):
    """Not a tuner layer, yet it computes something around the linear layer it holds as ``base_layer``."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.base_layer(x)


def test_any_module_between_lora_and_its_linear_runs_peft_forward(kernel_device):
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(MLP().to(kernel_device), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
        model.base_model.model.lin0.base_layer = Doubled(model.base_model.model.lin0.base_layer)
        models.append(model)
    stock, patched = models
    report = lora_engine.patch_peft_model(patched)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(3)).to(kernel_device)
    with torch.no_grad():
        assert torch.equal(patched(x), stock(x))
    assert list(report.fallbacks) == ["base_model.model.lin0"], str(report)
    assert "Doubled module sits between the LoRA layer and its base Linear" in str(report)


# ---------------------------------------------------------------------------------------------------------------
# PEFT's names: repr, get_layer_status and get_model_status show lora.Linear / lora.Linear4bit as before


def _status(model: nn.Module) -> tuple:
    return repr(model), get_layer_status(model), get_model_status(model)


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
def test_patched_layers_keep_peft_names(four_bit, kernel_device):
    if four_bit:
        stock, patched = _peft_net(kernel_device), _peft_net(kernel_device)
    else:
        stock, patched = (get_peft_model(MLP().to(kernel_device), LoraConfig(target_modules=MLP_TARGETS)) for _ in "ab")
    before = _status(patched)
    report = lora_engine.patch_peft_model(patched)
    assert report.num_patched == (3 if four_bit else 2), str(report)
    assert any(type(m) in (FusedLoraLinear, FusedLoraLinear4bit) for m in patched.modules())
    after = _status(patched)
    assert after[0] == before[0], "repr changed"
    assert after[1] == before[1] and after[2] == before[2]
    types = {status.module_type for status in after[1]}
    assert types == ({"lora.Linear4bit", "lora.Linear"} if four_bit else {"lora.Linear"})

    # a second adapter on "all-linear" still finds the patched layers, as it does the stock ones
    for model in (stock, patched):
        model.add_adapter("other", LoraConfig(r=4, target_modules="all-linear"))
    assert _status(patched) == _status(stock)
    assert lora_engine.unpatch_peft_model(patched) == report.num_patched
    assert _status(patched) == _status(stock)


# ---------------------------------------------------------------------------------------------------------------
# Undo, repeat, bad input


def test_unpatch_restores_peft_classes_and_patching_twice_is_harmless(kernel_device):
    stock, patched = _peft_net(kernel_device), _peft_net(kernel_device, patch=True)
    again = lora_engine.patch_peft_model(patched)
    assert again.num_patched == 3 and type(_layers(patched)["q"]) is FusedLoraLinear4bit
    assert lora_engine.unpatch_peft_model(patched) == 3
    assert [type(layer) for layer in _layers(patched).values()] == [PeftLinear4bit, PeftLinear4bit, PeftLinear]
    assert not any(hasattr(layer, "_lora_engine_patch") for layer in _layers(patched).values())
    x = _x(kernel_device)
    with torch.no_grad():
        assert torch.equal(patched(x), stock(x))
    assert lora_engine.unpatch_peft_model(patched) == 0


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lora_engine.patch_peft_model("model")
    with pytest.raises(ValueError, match="no PEFT LoRA or IA3 layers.*get_peft_model"):
        lora_engine.patch_peft_model(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="unpatch_peft_model needs a torch.nn.Module"):
        lora_engine.unpatch_peft_model(None)
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        register_fused_layers({"r": 8})


# ---------------------------------------------------------------------------------------------------------------
# PEFT's workflows on a patched model


def test_save_and_load_round_trip_with_stock_peft(tmp_path, kernel_device):
    patched = _peft_net(kernel_device, patch=True)
    patched.save_pretrained(tmp_path / "adapter")
    stock = PeftModel.from_pretrained(_net(kernel_device), tmp_path / "adapter")
    assert not any(type(m) in (FusedLoraLinear4bit, FusedLoraLinear) for m in stock.modules())
    x = _x(kernel_device)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), stock(x), rtol=1e-5, atol=1e-5)

    # A stock adapter loads into a patched model as a second adapter, and set_adapter switches between them.
    with torch.no_grad():
        for name, param in stock.named_parameters():
            if "lora_A" in name:
                param.mul_(-1.5)
    stock.save_pretrained(tmp_path / "second")
    patched.load_adapter(tmp_path / "second", adapter_name="second")
    assert type(_layers(patched)["q"]) is FusedLoraLinear4bit
    with torch.no_grad():
        patched.set_adapter("second")
        y_second = patched(x)
        torch.testing.assert_close(y_second, stock(x), rtol=1e-5, atol=1e-5)
        patched.set_adapter("default")
        assert not torch.allclose(patched(x), y_second)


def test_merge_and_unload_matches_stock(kernel_device):
    stock, patched = _peft_net(kernel_device), _peft_net(kernel_device, patch=True)
    x = _x(kernel_device)
    with torch.no_grad():
        merged, merged_stock = patched.merge_and_unload(), stock.merge_and_unload()
        # the merged 4-bit layers keep lora_engine's 4-bit path (they were patched with the model)
        assert type(merged.q) is FusedLinear4bit and type(merged.out) is nn.Linear
        assert repr(merged) == repr(merged_stock)
        _assert_close_fp32("merged", merged(x), merged_stock(x))
        assert lora_engine.unpatch_model(merged) == 2 and type(merged.q) is bnb.nn.Linear4bit
        assert torch.equal(merged(x), merged_stock(x)), "the merge must write the weights stock PEFT writes"
        assert merged.state_dict().keys() == merged_stock.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), merged_stock.state_dict().values()))
        assert not torch.equal(merged(x), _net(kernel_device)(x)), "the merge changed nothing"


def test_register_fused_layers_builds_fused_layers_in_get_peft_model(kernel_device):
    patched = _peft_net(kernel_device, patch=True)
    torch.manual_seed(1)
    config = register_fused_layers(LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    built = get_peft_model(_net(kernel_device), config)
    _randomize_lora_B(built)
    types = [type(layer) for layer in _layers(built).values()]
    assert types == [FusedLoraLinear4bit, FusedLoraLinear4bit, FusedLoraLinear]
    assert list(built.state_dict()) == list(patched.state_dict())
    x = _x(kernel_device)
    with torch.no_grad():
        assert torch.equal(built(x), patched(x))
    assert lora_engine.patch_peft_model(built).num_patched == 3


# ---------------------------------------------------------------------------------------------------------------
# The base weight as FSDP hands it to the forward


def test_a_gathered_plain_weight_runs_with_the_modules_quant_state(kernel_device):
    """FSDP gives the forward the gathered packed bytes as a plain tensor, without the quant state; bitsandbytes
    keeps it on the module too, and the fused forward reads it there instead of falling back."""
    stock, patched = _peft_net(kernel_device), _peft_net(kernel_device)
    report = lora_engine.patch_peft_model(patched)
    for name in ("q", "k"):
        base = getattr(patched.base_model.model, name).get_base_layer()
        assert base.quant_state is base.weight.quant_state
        base.weight = nn.Parameter(base.weight.data.clone(), requires_grad=False)  # the same bytes, no quant state
        assert not hasattr(base.weight, "quant_state")
    x = _x(kernel_device)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), stock(x), rtol=1e-4, atol=1e-4)
    assert report.num_fused == 3 and not report.fallbacks, str(report)


def test_packed_bytes_cast_to_another_dtype_are_refused(kernel_device):
    """Bytes converted value by value (FSDP's MixedPrecisionPolicy casting parameters) cannot be decoded: the
    forward names the problem, also where it would have fallen back to PEFT's forward (equally wrong)."""
    patched = _peft_net(kernel_device, patch=True)
    base = patched.base_model.model.q.get_base_layer()
    base.weight = nn.Parameter(base.weight.data.to(torch.bfloat16), requires_grad=False)
    for adapters_on in (True, False):  # the fused forward, and PEFT's forward for disabled adapters
        context = nullcontext() if adapters_on else patched.disable_adapter()
        with context, torch.no_grad(), pytest.raises(ValueError, match="stored as torch.uint8 but arrives as"):
            patched(_x(kernel_device))


def _count_fused_calls(monkeypatch) -> list:
    """A list that gets one entry per call of ``lora_engine.functional.lora_linear_4bit`` (the fused forward)."""
    calls = []
    original = lora_engine.functional.lora_linear_4bit
    monkeypatch.setattr(lora_engine.functional, "lora_linear_4bit", lambda *a, **k: calls.append(a) or
                        original(*a, **k))  # fmt: skip
    return calls


def test_fused_forward_finds_the_base_layer_without_peft_walk(monkeypatch, kernel_device):
    """PEFT's get_base_layer walks the base_layer chain and ends on an attribute miss through nn.Module's
    ``__getattr__`` (µs): the fused forward takes a direct base holding no ``base_layer`` itself without the walk,
    and reads the same weight. (Stacked tuner layers, which need the walk: test_lora_stacked_on_another_tuner...)"""
    model = _peft_net(kernel_device, patch=True)
    layer = _layers(model)["q"]
    walks = []
    original = type(layer).get_base_layer
    monkeypatch.setattr(type(layer), "get_base_layer", lambda self: walks.append(self) or original(self))
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        layer(_x(kernel_device))
    assert len(calls) == 1, "the layer did not run the fused forward"
    assert walks == [] and calls[0][1] is original(layer).weight


def test_attributes_read_past_nn_module_getattr_are_getattr(kernel_device):
    """The forward reads submodules, parameters and plain attributes from the module's own tables
    (``integration._attr``): for every name it reads, on every kind of module it reads them from, the very object
    ``getattr`` gives, a missing one included; and the base layer is ``get_base_layer()``'s."""
    for four_bit in (True, False):
        model = _peft_net(kernel_device, patch=True) if four_bit else get_peft_model(
            MLP().to(kernel_device), LoraConfig(target_modules=MLP_TARGETS, lora_dropout=0.1, lora_bias=True))
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            names = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", "base_layer", "scaling")
            for name in names:
                assert integration._attr(module, name) is getattr(module, name), name
            assert integration._base_layer(module) is module.get_base_layer()
            base = module.get_base_layer()
            for owner in (base, module.lora_A["default"], module.lora_B["default"]):
                for name in ("weight", "bias", "quant_state", "in_features"):
                    assert integration._attr(owner, name, "missing") is getattr(owner, name, "missing"), name
            with pytest.raises(AttributeError):
                integration._attr(base, "no_such_attribute")


def test_accelerate_hooks_on_the_factors_or_the_base_run_peft_forward(monkeypatch, kernel_device):
    """A module with an accelerate hook (offloading) must run its hooked forward: the layer falls back, by reason,
    and runs the fused kernels again once the hook is gone."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    stock, patched = _peft_net(kernel_device), _peft_net(kernel_device)
    report = lora_engine.patch_peft_model(patched)
    layer, stock_layer = _layers(patched)["q"], _layers(stock)["q"]
    calls = _count_fused_calls(monkeypatch)
    x = _x(kernel_device)
    for module, reason in ((layer.lora_A["default"], "the LoRA modules have forward hooks"),
                           (layer.get_base_layer(), "the base layer has forward hooks")):  # fmt: skip
        add_hook_to_module(module, ModelHook())
        with torch.no_grad():
            y = layer(x)
        assert not calls, f"a hooked module must not be skipped ({reason})"
        assert any(reason in r for r in report.fallbacks["base_model.model.q"]), str(report)
        with torch.no_grad():
            _assert_close_fp32(reason, y, stock_layer(x))
        remove_hook_from_module(module)
        with torch.no_grad():
            _assert_close_fp32(reason, layer(x), stock_layer(x))
        assert len(calls) == 1, "without the hook the layer runs the fused kernels again"
        calls.clear()


class _ScaledDropout(nn.Module):
    """A dropout module of a type the kernels do not draw: PEFT's forward must run it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


def test_each_call_reads_the_adapter_as_it_is_now(monkeypatch, kernel_device):
    """Nothing read from the adapter is kept between calls: a new dropout module, a scaling that is no number, a
    factor with a bias or replaced weights each decide the very next call, and the layer runs the kernels again
    once the change is undone."""
    stock, patched = _peft_net(kernel_device), _peft_net(kernel_device)
    report = lora_engine.patch_peft_model(patched)
    layer, stock_layer = _layers(patched)["q"], _layers(stock)["q"]
    calls = _count_fused_calls(monkeypatch)
    x = _x(kernel_device)

    def swap_dropout(module):
        old = module.lora_dropout["default"]
        module.lora_dropout["default"] = _ScaledDropout()
        return lambda: module.lora_dropout.__setitem__("default", old)

    def tensor_scaling(module):
        old = module.scaling["default"]
        module.scaling["default"] = torch.tensor(old)
        return lambda: module.scaling.__setitem__("default", old)

    def biased_factor(module):
        lora_A = module.lora_A["default"]
        lora_A.bias = nn.Parameter(torch.full((lora_A.out_features,), 0.25, device=lora_A.weight.device))
        return lambda: setattr(lora_A, "bias", None)

    changes = {
        "dropout module _ScaledDropout": swap_dropout,
        "scaling is not a Python number": tensor_scaling,
        "LoRA factors are not nn.Linear modules with the biases PEFT gives them": biased_factor,
    }
    with torch.no_grad():
        for reason, change in changes.items():
            undo = [change(module) for module in (layer, stock_layer)]
            y = layer(x)
            assert not calls, f"the fused kernels ran after the change ({reason})"
            assert any(reason in r for r in report.fallbacks["base_model.model.q"]), str(report)
            _assert_close_fp32(reason, y, stock_layer(x))
            for restore in undo:
                restore()
            _assert_close_fp32(reason, layer(x), stock_layer(x))
            assert len(calls) == 1, f"undoing the change ({reason}) did not bring the fused kernels back"
            calls.clear()
        # new factor weights (load_adapter, an optimizer replacing parameters): the next call multiplies by them
        for module in (layer, stock_layer):
            lora_B = module.lora_B["default"]
            lora_B.weight = nn.Parameter(lora_B.weight * -2.0)
        _assert_close_fp32("replaced lora_B", layer(x), stock_layer(x))
        assert len(calls) == 1

"""LoRA modules sharded on their own by FSDP2 (what HF Trainer does to a PEFT model, through PEFT's
``fsdp_auto_wrap_policy``), in one process: a gloo group of one rank, so every parameter is a DTensor gathered by
its module's forward, as on many ranks.

The fused forward reads each sharded factor (and DoRA's magnitude) whole inside FSDP's gather, through a method FSDP
runs as a forward of its module, then runs the kernels it runs over unsharded modules. It must give what stock PEFT
gives on the same sharded model, gradients included (with dropout, what it gives unsharded: the kernels draw their
own mask). Many ranks: ``tests/integrations/test_distributed.py`` (the same
wrapping over two gloo ranks trains as one process).

Tolerance: both sides compute in fp32 from the same decoded 4-bit weight (bitsandbytes' CPU kernel on the stock
side, the kernels in the interpreter here); they differ by the fp32 rounding of K-long sums, ~1e-6 relative.
1e-4 of each tensor's largest value leaves a wide margin, while a missing low-rank term or a gradient share lost
moves them by tens of percent.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn

import lora_engine
from lora_engine import functional

pytestmark = pytest.mark.interpreter

RTOL = 1e-4  # of each tensor's largest value


class Net(nn.Module):
    """Two 4-bit projections with odd shapes (NF4 nested with a bias; FP4 plain without, K odd) and a dense one."""

    is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT then wraps Linear4bit as lora.Linear4bit

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.q = bnb.nn.Linear4bit(100, 37, bias=True, compute_dtype=dtype, quant_type="nf4",
                                   compress_statistics=True)  # fmt: skip
        self.k = bnb.nn.Linear4bit(37, 45, bias=False, compute_dtype=dtype, quant_type="fp4",
                                   compress_statistics=False)  # fmt: skip
        self.out = nn.Linear(45, 29, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.k(torch.relu(self.q(x)))))


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A gloo process group of one rank for the tests of this module, torn down after them."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("fsdp") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _peft_net(kernel_device: str, dtype: torch.dtype = torch.float32, **lora) -> nn.Module:
    """The Net with PEFT LoRA on its three layers, its factors in fp32 (PEFT upcasts 16-bit ones)."""
    torch.manual_seed(0)
    net = Net(dtype).to(kernel_device)  # bitsandbytes quantizes on the move to a device
    model = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "k", "out"], **lora))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # fresh lora_B is zero, which hides every mistake in the LoRA term
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(torch.randn(param.shape, generator=gen).to(param.device) * 0.2)
    return model


def _shard_lora_modules(model: nn.Module, root: bool = True) -> nn.Module:
    """PEFT's fsdp_auto_wrap_policy under FSDP2: every leaf module with a trainable parameter, then the root
    (which shards the base weights, gathered in its forward)."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if not any(module.children()) and any(p.requires_grad for p in module.parameters()):
            fully_shard(module)
    if root:
        fully_shard(model)
    return model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _train_step(
    model: nn.Module, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every trainable parameter's gradient for one batch (dropout drawn from ``seed``)."""
    device = next(model.parameters()).device
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    torch.manual_seed(seed)
    y = model(x)
    (y.square() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    grads = {name: _full(p.grad).clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return y.detach(), grads


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    worst = (got - want).float().abs().max().item()
    bound = rtol * want.float().abs().max().item()
    assert want.abs().max() > 0, f"{what}: degenerate case, all zero"
    assert worst <= bound, f"{what}: max |difference| {worst:.3g} > {bound:.3g} ({rtol:g} of max |value|)"


def _count(monkeypatch, name: str, module=functional) -> list:
    """The calls of ``module.name`` from now on, each recorded by its first argument."""
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a[0] if a else None) or original(*a, **k))
    return calls


@pytest.mark.parametrize(
    "dtype, lora",
    [
        (torch.float32, {}),
        (torch.float32, {"lora_bias": True}),
        (torch.float16, {"lora_bias": True}),
        (torch.float32, {"lora_dropout": 0.1}),
        (torch.float32, {"lora_dropout": 0.1, "lora_bias": True}),
    ],
    ids=["fp32", "fp32-lora_bias", "fp16-lora_bias", "fp32-dropout", "fp32-dropout-lora_bias"],
)
def test_sharded_lora_modules_run_the_fused_forward(dtype, lora, one_rank_group, monkeypatch, kernel_device):
    """Against stock PEFT on the same sharded model; with dropout, against the patched model unsharded under the same
    seed (the kernels draw their own mask). fp16 activations over fp32 factors (PEFT's upcast): the run differs
    from stock PEFT by fp16 rounding of each layer's output (measured 1.1e-3 of the largest value): 1e-2.
    ``lora_bias``: lora_B's bias read whole with its weight, on the layers with a base bias (q, out) and without
    one (k)."""
    from lora_engine.integrations import peft as integration

    rtol = RTOL if dtype == torch.float32 else 1e-2
    dropout = lora.get("lora_dropout", 0.0) > 0
    if dropout:
        reference = _peft_net(kernel_device, dtype, **lora)
        lora_engine.patch_peft_model(reference)
        reference.train()
    else:
        reference = _shard_lora_modules(_peft_net(kernel_device, dtype, **lora)).train()
    patched = _peft_net(kernel_device, dtype, **lora)
    report = lora_engine.patch_peft_model(patched)
    patched = _shard_lora_modules(patched).train()
    registered = _count(monkeypatch, "register_fsdp_forward_method", integration)  # by module
    fused_4bit, fused_dense = _count(monkeypatch, "lora_linear_4bit"), _count(monkeypatch, "lora_linear")

    for step in range(2):  # a second step: the modules resharded after the first and gathered again
        y, grads = _train_step(patched, seed=10 + step, dtype=dtype)
        y_ref, grads_ref = _train_step(reference, seed=10 + step, dtype=dtype)
        assert y.dtype == dtype
        _assert_close(y, y_ref, f"step {step} output", rtol)
        expected = 9 if lora.get("lora_bias") else 6
        assert sorted(grads) == sorted(grads_ref) and len(grads) == expected, sorted(grads)
        for name, grad in grads.items():
            assert grad.dtype == torch.float32, name
            _assert_close(grad, grads_ref[name], f"step {step} {name}", rtol)
    calls = 2 if dropout else 1  # the unsharded reference calls the kernels too
    assert len(fused_4bit) == 4 * calls and len(fused_dense) == 2 * calls, "each layer, each step, fused"
    assert report.num_fused == 3 and not report.fallbacks, report.summary()
    assert len(registered) == len({id(m) for m in registered}) == 6, "one registration per sharded module"


def test_several_adapters_over_sharded_lora_modules(one_rank_group, monkeypatch, kernel_device):
    """Two active adapters (ranks 8 and 4, dropout and lora_bias on one each): both left factors through their sharded
    modules (each adapter's mask drawn by its own dropout module, as PEFT draws it), B factors and lora_B's bias read
    whole, one call with their terms side by side; stock PEFT's output and gradients under the same seed."""

    def two_adapters(model: nn.Module) -> nn.Module:
        torch.manual_seed(2)
        model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "out"], lora_bias=True))
        model.base_model.set_adapter(["default", "other"])
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_B.other" in name:
                    param.add_(torch.randn(param.shape, generator=gen).to(param.device) * 0.2)
        return model

    stock = _shard_lora_modules(two_adapters(_peft_net(kernel_device, lora_dropout=0.1))).train()
    patched = two_adapters(_peft_net(kernel_device, lora_dropout=0.1))
    report = lora_engine.patch_peft_model(patched)
    patched = _shard_lora_modules(patched).train()
    lowrank_4bit = _count(monkeypatch, "lowrank_linear_4bit")
    y, grads = _train_step(patched, seed=7)
    y_stock, grads_stock = _train_step(stock, seed=7)
    _assert_close(y, y_stock, "output")
    assert sorted(grads) == sorted(grads_stock) and len(grads) == 15, sorted(grads)
    for name, grad in grads.items():
        _assert_close(grad, grads_stock[name], name)
    assert len(lowrank_4bit) == 2 and report.num_fused == 3 and not report.fallbacks, report.summary()


def test_mixed_batches_over_sharded_lora_modules(one_rank_group, monkeypatch, kernel_device):
    """PEFT's adapter_names (inference): each named adapter's factors read whole, one multi-LoRA call per 4-bit layer;
    stock PEFT's output on the same sharded model."""

    def two_adapters(model: nn.Module) -> nn.Module:
        torch.manual_seed(2)
        model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "out"]))
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_B.other" in name:
                    param.add_(torch.randn(param.shape, generator=gen).to(param.device) * 0.2)
        return model

    stock = _shard_lora_modules(two_adapters(_peft_net(kernel_device))).eval()
    patched = two_adapters(_peft_net(kernel_device))
    report = lora_engine.patch_peft_model(patched)
    patched = _shard_lora_modules(patched).eval()
    multi_lora = _count(monkeypatch, "multi_lora_linear_4bit")
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        y, y_stock = patched(x, adapter_names=names), stock(x, adapter_names=names)
    _assert_close(y, y_stock, "output")
    assert len(multi_lora) == 2, "both 4-bit layers"
    assert list(report.fallbacks) == ["base_model.model.out"], report.summary()  # dense: mixed batches over 4-bit only


@pytest.mark.parametrize("sharded", ["every-lora-module", "magnitude-only"])
def test_dora_over_sharded_lora_modules_reads_its_weights_whole(sharded, one_rank_group, monkeypatch, kernel_device):
    """DoRA's weight norm needs A, B and the magnitude whole: each copied inside FSDP's gather by a method registered
    as a forward of its module, once per module, then the fused DoRA forward; stock PEFT's under the same wrapping,
    the root sharded too (HF Trainer's)."""
    from torch.distributed.fsdp import fully_shard

    from lora_engine.integrations import peft as integration

    def shard(model: nn.Module) -> nn.Module:
        if sharded == "every-lora-module":
            return _shard_lora_modules(model).train()
        for name, module in model.named_modules():
            if name.split(".")[-2:-1] == ["lora_magnitude_vector"]:
                fully_shard(module)
        return fully_shard(model).train()

    stock = shard(_peft_net(kernel_device, use_dora=True))
    patched = _peft_net(kernel_device, use_dora=True)
    report = lora_engine.patch_peft_model(patched)
    patched = shard(patched)
    registered = _count(monkeypatch, "register_fsdp_forward_method", integration)  # by module
    dora_4bit, dora_dense = _count(monkeypatch, "dora_linear_4bit"), _count(monkeypatch, "dora_linear")

    for step in range(2):  # a second step: the modules resharded after the first and gathered again
        y, grads = _train_step(patched, seed=3)
        y_stock, grads_stock = _train_step(stock, seed=3)
        _assert_close(y, y_stock, f"step {step} output")
        assert sorted(grads) == sorted(grads_stock) and len(grads) == 9, sorted(grads)
        for name, grad in grads.items():
            _assert_close(grad, grads_stock[name], f"step {step} {name}")
    assert len(dora_4bit) == 4 and len(dora_dense) == 2, "each layer, each step, fused"
    assert report.num_fused == 3 and not report.fallbacks, report.summary()
    expected = 9 if sharded == "every-lora-module" else 3
    assert len(registered) == len({id(m) for m in registered}) == expected, "one registration per sharded module"


def test_grouped_projections_over_sharded_lora_modules(one_rank_group, make_peft_llama, tokens, monkeypatch):
    """The grouped forward reads each projection's factors whole as the per-layer one does: over sharded LoRA modules
    the q/k/v and gate/up groups still run grouped, and the model gives what it gives ungrouped."""
    import lora_engine.integrations.grouped as grouped_integration

    calls = _count(monkeypatch, "grouped_lora_linear_4bit", grouped_integration)
    ungrouped, grouped = make_peft_llama(), make_peft_llama()  # the same weights
    lora_engine.patch_peft_model(ungrouped)
    report = lora_engine.patch_peft_model(grouped, group_projections=True)
    assert report.grouped
    ungrouped, grouped = _shard_lora_modules(ungrouped), _shard_lora_modules(grouped)
    ids = tokens(0)
    with torch.no_grad():
        want, got = ungrouped(input_ids=ids).logits, grouped(input_ids=ids).logits
    _assert_close(got, want, "logits")
    assert not report.group_fallbacks and not report.fallbacks, report.summary()
    assert len(calls) == 2 * len(grouped.base_model.model.model.layers), "q/k/v and gate/up of every layer, grouped"

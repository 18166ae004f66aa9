"""LoRA modules sharded on their own by FSDP2 (what HF Trainer does to a PEFT model, through PEFT's
``fsdp_auto_wrap_policy``), in one process: a gloo group of one rank, so every parameter is a DTensor gathered by
its module's forward, as on many ranks. At the end: the same modules wrapped on their own by FSDP1.

The fused forward reads each sharded factor (and DoRA's magnitude) whole inside FSDP's gather, through a method FSDP
runs as a forward of its module, then runs the kernels it runs over unsharded modules. It must give what stock PEFT
gives on the same sharded model, gradients included (with dropout, what it gives unsharded: the kernels draw their
own mask). Many ranks: ``tests/integrations/test_distributed.py`` (the same wrapping over two gloo ranks trains as
one process).

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

    def __init__(self, dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8) -> None:
        super().__init__()
        self.q = bnb.nn.Linear4bit(100, 37, bias=True, compute_dtype=dtype, quant_type="nf4",
                                   compress_statistics=True, quant_storage=quant_storage)  # fmt: skip
        self.k = bnb.nn.Linear4bit(37, 45, bias=False, compute_dtype=dtype, quant_type="fp4",
                                   compress_statistics=False, quant_storage=quant_storage)  # fmt: skip
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


def _peft_net(
    kernel_device: str, dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8, **lora
) -> nn.Module:
    """The Net with PEFT LoRA on its three layers, its factors in fp32 (PEFT upcasts 16-bit ones)."""
    torch.manual_seed(0)
    net = Net(dtype, quant_storage).to(kernel_device)  # bitsandbytes quantizes on the move to a device
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


# plain LoRA: the dtype of x and the LoRA config, for the FSDP2 and FSDP1 wrappings alike
LORA_CASES = [
    (torch.float32, {}),
    (torch.float32, {"lora_bias": True}),
    (torch.float16, {"lora_bias": True}),
    (torch.float32, {"lora_dropout": 0.1}),
    (torch.float32, {"lora_dropout": 0.1, "lora_bias": True}),
]
LORA_IDS = ["fp32", "fp32-lora_bias", "fp16-lora_bias", "fp32-dropout", "fp32-dropout-lora_bias"]


@pytest.mark.parametrize("dtype, lora", LORA_CASES, ids=LORA_IDS)
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


def _with_other_adapter(model: nn.Module, lora_bias: bool = False, both_active: bool = False) -> nn.Module:
    """``model`` with a second adapter "other" (rank 4) on the three layers, its lora_B off zero."""
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "out"], lora_bias=lora_bias))
    if both_active:
        model.base_model.set_adapter(["default", "other"])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B.other" in name:
                param.add_(torch.randn(param.shape, generator=gen).to(param.device) * 0.2)
    return model


@pytest.mark.parametrize("wrapping", ["fsdp2", "fsdp1"])
def test_several_adapters_over_sharded_lora_modules(wrapping, one_rank_group, monkeypatch, kernel_device):
    """Two active adapters (ranks 8 and 4, dropout and lora_bias on one each): both left factors through their sharded
    or wrapped modules (each adapter's mask drawn by its own dropout module, as PEFT draws it), B factors and
    lora_B's bias read whole (FSDP2) or through lora_B's forward (FSDP1), one call with their terms side by side;
    stock PEFT's output and gradients under the same seed."""
    wrap = {"fsdp2": _shard_lora_modules, "fsdp1": _wrap_lora_modules}[wrapping]
    stock = wrap(_with_other_adapter(_peft_net(kernel_device, lora_dropout=0.1), True, True)).train()
    patched = _with_other_adapter(_peft_net(kernel_device, lora_dropout=0.1), True, True)
    report = lora_engine.patch_peft_model(patched)
    patched = wrap(patched).train()
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
    stock = _shard_lora_modules(_with_other_adapter(_peft_net(kernel_device))).eval()
    patched = _with_other_adapter(_peft_net(kernel_device))
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


def test_ia3_vectors_sharded_on_their_own_run_the_fused_forward(one_rank_group, monkeypatch, kernel_device):
    """PEFT's wrap policy shards each IA3 layer's ``ia3_l`` ParameterDict on its own, and nothing calls a forward of it
    (stock PEFT's forward fails on the shard there): each vector is read whole by a method registered as a forward of
    its ParameterDict, once per dict. Against the patched model unsharded (same weights) over two steps, the input
    scale of the feed-forward layer k and the output scale of q and out, every gradient."""
    from peft import IA3Config

    from lora_engine.integrations import peft as integration

    def ia3_net() -> nn.Module:
        torch.manual_seed(0)
        model = get_peft_model(Net(torch.float32).to(kernel_device),
                               IA3Config(target_modules=["q", "k", "out"], feedforward_modules=["k"]))  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # fresh vectors are ones: move them off, so a lost scale shows
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=gen).to(param.device) * 0.3)
        return model

    reference, patched = ia3_net(), ia3_net()
    lora_engine.patch_peft_model(reference)
    report = lora_engine.patch_peft_model(patched)
    patched = _shard_lora_modules(patched).train()
    registered = _count(monkeypatch, "register_fsdp_forward_method", integration)  # by module
    fused_4bit, fused_dense = _count(monkeypatch, "ia3_linear_4bit"), _count(monkeypatch, "ia3_linear")
    for step in range(2):
        y, grads = _train_step(patched, seed=step)
        y_ref, grads_ref = _train_step(reference.train(), seed=step)
        _assert_close(y, y_ref, f"step {step} output")
        assert sorted(grads) == sorted(grads_ref) and len(grads) == 3, sorted(grads)
        for name, grad in grads.items():
            _assert_close(grad, grads_ref[name], f"step {step} {name}")
    assert len(fused_4bit) == 2 * 2 * 2 and len(fused_dense) == 2 * 2, "each layer, each step, both models"
    assert report.num_fused == 3 and not report.fallbacks, report.summary()
    assert len(registered) == len({id(m) for m in registered}) == 3, "one registration per ParameterDict"


@pytest.mark.parametrize("wrapping", ["fsdp2", "fsdp1"])
def test_grouped_projections_over_sharded_lora_modules(
    wrapping, one_rank_group, make_peft_llama, tokens, monkeypatch
):
    """The grouped forward reads each projection's factors whole as the per-layer one does: over LoRA modules FSDP2
    shards on their own the q/k/v and gate/up groups still run grouped; over FSDP1 wrappers, which hand the factors
    whole to nothing but their own forwards, per layer (reported). Either way the model gives what it gives
    ungrouped."""
    import lora_engine.integrations.grouped as grouped_integration

    wrap = {"fsdp2": _shard_lora_modules, "fsdp1": _wrap_lora_modules}[wrapping]
    calls = _count(monkeypatch, "grouped_lora_linear_4bit", grouped_integration)
    ungrouped, grouped = make_peft_llama(), make_peft_llama()  # the same weights
    lora_engine.patch_peft_model(ungrouped)
    report = lora_engine.patch_peft_model(grouped, group_projections=True)
    assert report.grouped
    ungrouped, grouped = wrap(ungrouped), wrap(grouped)
    ids = tokens(0)
    with torch.no_grad():
        want, got = ungrouped(input_ids=ids).logits, grouped(input_ids=ids).logits
    _assert_close(got, want, "logits")
    assert not report.fallbacks, report.summary()
    groups = 2 * len(grouped.base_model.model.model.layers)  # q/k/v and gate/up of every layer
    if wrapping == "fsdp2":
        assert not report.group_fallbacks and len(calls) == groups, report.summary()
    else:
        reasons = [reason for reasons in report.group_fallbacks.values() for reason in reasons]
        assert not calls and len(report.group_fallbacks) == groups, report.summary()
        assert all("left factors made by the LoRA modules' own forwards" in reason for reason in reasons), reasons


# ---------------------------------------------------------------------------------------------------------------------
# FSDP1 (PEFT's fsdp_auto_wrap_policy under FSDP1, the version accelerate picks unless told otherwise) gathers a wrapped
# module only inside the wrapper's forward: the fused forward makes the left factor with lora_A(drop(x)) through it and
# reads B from lora_B on the identity, then one lowrank_linear_4bit call; DoRA and mixed batches run PEFT's forward.
# FSDP1 refuses to run without an accelerator, so on the CPU the wrapper is the stand-in below: FSDP1's contract, the
# parameters whole only inside the wrapper's forward and freed outside it (a read there raises). Both sides draw the
# dropout mask with torch's dropout module, so patched and stock PEFT agree under one seed, dropout included. On a GPU
# the last test runs FSDP1 itself (one rank: FSDP1 keeps the parameters unsharded there, which checks the integration
# with its wrapper classes and, with the root wrapped, the base weights flattened into FSDP1's flat parameter).


class _Freed(torch.Tensor):
    """A parameter outside its FSDP1 wrapper's forward: FSDP1 leaves a tensor of its shape and dtype whose storage it
    freed (reading it is undefined behaviour); this one answers for its metadata and raises on any computation."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "__get__" or func in (torch.Tensor.size, torch.Tensor.dim):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise RuntimeError(f"{getattr(func, '__name__', func)}: a read of a parameter FSDP1 freed")


def _freed(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device).as_subclass(_Freed)


class FullyShardedDataParallel(nn.Module):
    """FSDP1's wrapper of one module, as the fused forward meets it: the wrapper owns the parameters (FSDP1's flat
    parameter), the wrapped module sees them whole only inside the wrapper's forward and freed tensors of their
    shapes outside it; other attributes are read through to the wrapped module, which ``.module`` returns."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = module
        self.flat = nn.ParameterDict()
        for name, param in list(module.named_parameters(recurse=False)):
            del module._parameters[name]
            self.flat[name] = param
            vars(module)[name] = _freed(param)

    @property
    def module(self) -> nn.Module:
        return self._fsdp_wrapped_module

    def forward(self, *args, **kwargs):
        module = self._fsdp_wrapped_module
        vars(module).update(self.flat.items())
        try:
            return module(*args, **kwargs)
        finally:
            vars(module).update((name, _freed(param)) for name, param in self.flat.items())

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._fsdp_wrapped_module, name)

    def __getitem__(self, key):  # FSDP1 forwards indexing to the wrapped module too
        return self._fsdp_wrapped_module[key]


def _wrap_lora_modules(model: nn.Module, wrapper=FullyShardedDataParallel) -> nn.Module:
    """PEFT's fsdp_auto_wrap_policy's choice: every leaf module with a trainable parameter, wrapped on its own."""
    leaves = [(name, module) for name, module in model.named_modules()
              if not any(module.children()) and any(p.requires_grad for p in module.parameters())]  # fmt: skip
    for name, module in leaves:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, wrapper(module))
    return model


def test_the_stand_in_frees_the_parameters_outside_its_forward():
    """The premise of the tests below: a read of a wrapped factor outside the wrapper's forward fails."""
    wrapped = FullyShardedDataParallel(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    assert wrapped(x).shape == (2, 3)
    assert wrapped.weight.shape == (3, 4) and wrapped.weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match="FSDP1 freed"):
        torch.nn.functional.linear(x, wrapped.weight)


@pytest.mark.parametrize("dtype, lora", LORA_CASES, ids=LORA_IDS)
def test_fsdp1_lora_modules_run_the_fused_forward(dtype, lora, monkeypatch, kernel_device):
    """Against stock PEFT on the same wrapping over two steps, every gradient; each layer fused each step, through the
    left factor its wrapped lora_A makes. fp16 activations over fp32 factors (PEFT's upcast): 1e-2."""
    rtol = RTOL if dtype == torch.float32 else 1e-2
    stock = _wrap_lora_modules(_peft_net(kernel_device, dtype, **lora)).train()
    patched = _peft_net(kernel_device, dtype, **lora)
    report = lora_engine.patch_peft_model(patched)
    patched = _wrap_lora_modules(patched).train()
    lowrank_4bit, lowrank_dense = _count(monkeypatch, "lowrank_linear_4bit"), _count(monkeypatch, "lowrank_linear")

    for step in range(2):
        y, grads = _train_step(patched, seed=10 + step, dtype=dtype)
        y_stock, grads_stock = _train_step(stock, seed=10 + step, dtype=dtype)
        assert y.dtype == dtype
        _assert_close(y, y_stock, f"step {step} output", rtol)
        expected = 9 if lora.get("lora_bias") else 6
        assert sorted(grads) == sorted(grads_stock) and len(grads) == expected, sorted(grads)
        for name, grad in grads.items():
            _assert_close(grad, grads_stock[name], f"step {step} {name}", rtol)
    assert len(lowrank_4bit) == 4 and len(lowrank_dense) == 2, "each layer, each step, fused"
    assert report.num_fused == 3 and not report.fallbacks, report.summary()


def test_dora_and_mixed_batches_over_fsdp1_lora_modules_run_peft_forward(monkeypatch, kernel_device):
    """They need the factors whole, which FSDP1 gathers only inside the modules' forwards: PEFT's forward, the
    report naming FSDP1 and the fix, and stock PEFT's results."""
    from lora_engine.integrations import peft as integration

    messages = []
    monkeypatch.setattr(integration, "_note_fallback", lambda layer, reason: messages.append(reason))
    stock = _wrap_lora_modules(_peft_net(kernel_device, use_dora=True)).train()
    patched = _peft_net(kernel_device, use_dora=True)
    lora_engine.patch_peft_model(patched)
    patched = _wrap_lora_modules(patched).train()
    y, grads = _train_step(patched, seed=3)
    y_stock, grads_stock = _train_step(stock, seed=3)
    _assert_close(y, y_stock, "DoRA output")
    for name, grad in grads.items():
        _assert_close(grad, grads_stock[name], f"DoRA {name}")
    assert len(messages) == 3 and all("DoRA: FSDP1 wraps the LoRA modules" in m for m in messages), messages

    messages.clear()
    stock = _wrap_lora_modules(_peft_net(kernel_device)).eval()
    patched = _peft_net(kernel_device)
    lora_engine.patch_peft_model(patched)
    patched = _wrap_lora_modules(patched).eval()
    x = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    with torch.no_grad():
        y, y_stock = patched(x, adapter_names=["default", "__base__"]), stock(x, adapter_names=["default", "__base__"])
    _assert_close(y, y_stock, "mixed-batch output")
    assert any("mixed-batch adapter_names: FSDP1 wraps" in m for m in messages), messages


@pytest.mark.gpu
@pytest.mark.parametrize("root", [False, True], ids=["lora-modules", "lora-modules-and-root"])
def test_real_fsdp1_wrappers_run_the_fused_forward(root, one_rank_group, monkeypatch, kernel_device):
    """FSDP1 itself around the LoRA modules, and around the whole model too as HF Trainer wraps it (the packed bytes
    stored in float32, since FSDP1 flattens the root's frozen parameters into one tensor of one dtype): stock PEFT's
    outputs and gradients on the same wrapping, every layer fused. One rank (gloo, which reduces CUDA gradients too):
    FSDP1 keeps the parameters unsharded there (NO_SHARD)."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not torch.cuda.is_available():
        pytest.skip("FSDP1 needs an accelerator")
    wrap_one = functools.partial(FSDP, device_id=torch.cuda.current_device(), use_orig_params=False)

    def wrap(model: nn.Module) -> nn.Module:
        model = _wrap_lora_modules(model, wrapper=wrap_one)
        return (wrap_one(model) if root else model).train()

    storage = torch.float32 if root else torch.uint8
    stock = wrap(_peft_net(kernel_device, quant_storage=storage))
    patched = _peft_net(kernel_device, quant_storage=storage)
    report = lora_engine.patch_peft_model(patched)
    patched = wrap(patched)
    lowrank_4bit = _count(monkeypatch, "lowrank_linear_4bit")
    y, grads = _train_step(patched, seed=4)
    y_stock, grads_stock = _train_step(stock, seed=4)
    _assert_close(y, y_stock, "output")
    assert sorted(grads) == sorted(grads_stock) and grads, sorted(grads)
    for name, grad in grads.items():
        _assert_close(grad, grads_stock[name], name)
    assert len(lowrank_4bit) == 2 and report.num_fused == 3 and not report.fallbacks, report.summary()


def test_ia3_vectors_fsdp1_wraps_are_reported(monkeypatch, kernel_device):
    """FSDP1 wraps each ``ia3_l`` ParameterDict on its own and nothing gathers it (no forward of it runs): the
    report names FSDP1 and the fix before PEFT's forward runs, which cannot read the vector either."""
    from peft import IA3Config

    from lora_engine.integrations import peft as integration

    messages = []
    monkeypatch.setattr(integration, "_note_fallback", lambda layer, reason: messages.append(reason))
    torch.manual_seed(0)
    model = get_peft_model(Net(torch.float32).to(kernel_device),
                           IA3Config(target_modules=["q", "k", "out"], feedforward_modules=["k"]))  # fmt: skip
    lora_engine.patch_peft_model(model)
    model = _wrap_lora_modules(model)
    with pytest.raises(RuntimeError, match="FSDP1 freed"):
        model(torch.randn(2, 100).to(kernel_device))
    assert messages and "FSDP1 wraps the IA3 vectors" in messages[0], messages

"""torch.compile over the fused layers: the custom ops pass torch's operator checks, our layers trace without a
graph break (fullgraph=True), and compiled forward + backward give what eager gives.

The compiled tests use the default Inductor backend (see BACKEND). The kernels themselves are opaque to the
compiler (custom ops), so under TRITON_INTERPRET=1 Inductor compiles the surrounding graph for the CPU and calls
the ops, which run the kernels in the interpreter exactly as in eager mode. Inductor draws random numbers with its own
generator, so ``fallback_random`` makes the compiled dropout seed the eager one: with it, compiled and eager
runs drop the same elements and must agree.
"""

import shutil

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch._inductor.config as inductor_config
from peft import LoraConfig, get_peft_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lora_engine
from lora_engine import LoRALinear, LoRALinear4bit, autograd, custom_ops
from lora_engine.format import packed_4bit
from lora_engine.kernels import dequantize
from lora_engine.kinds import Dora

pytestmark = pytest.mark.interpreter

# Inductor writes C++ for the CPU part of a graph. Without a C++ compiler, aot_eager still runs the whole path
# under test (Dynamo's capture with the custom ops, AOT autograd's joint forward/backward graph) and executes
# the graph eagerly.
BACKEND = "inductor" if torch.cuda.is_available() or shutil.which("g++") or shutil.which("c++") else "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def _layer_4bit(dropout: float, device: str) -> LoRALinear4bit:
    torch.manual_seed(0)
    layer = LoRALinear4bit(
        100, 37, r=8, lora_alpha=16, lora_dropout=dropout, compute_dtype=torch.float32, device=torch.device(device)
    )
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)  # fresh B is zero, which hides mistakes in the LoRA term
    return layer.train()


def _op_args(weight, dropout_p: float, keep_left: bool, device: str):
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    x, lora_A, lora_B, bias = leaf(7, 100), leaf(8, 100), leaf(37, 8), leaf(37)
    tensors, sizes = custom_ops.weight_parts(weight)
    seed = custom_ops.seed_tensor(3) if dropout_p else None
    return (x, lora_A, lora_B, bias, tensors, sizes, 1.5, dropout_p, seed, "fused", keep_left)


@pytest.mark.parametrize("weight_kind", ["4bit_nested", "dense"])
def test_custom_op_passes_torch_opcheck(weight_kind, kernel_device):
    """Schema, fake (meta) implementation, autograd registration and AOT tracing with dynamic shapes."""
    layer = _layer_4bit(0.0, kernel_device)
    if weight_kind == "dense":
        weight = torch.randn(37, 100, generator=torch.Generator().manual_seed(1)).to(kernel_device)
        args = _op_args(weight, 0.0, True, kernel_device)
    else:
        weight = packed_4bit(layer.weight, layer.weight.quant_state)
        args = _op_args(weight, 0.1, True, kernel_device)
    torch.library.opcheck(custom_ops.lora_linear_fwd, args)
    # keep_left=False while lora_B wants a gradient: the backward op recomputes drop(x)·Aᵀ itself
    torch.library.opcheck(custom_ops.lora_linear_fwd, args[:-1] + (False,))


def _run(module: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward from a fixed torch seed; returns the output and the gradients (cleared after)."""
    torch.manual_seed(seed)
    y = module(x)
    (y.float().square().sum()).backward()
    leaves = [x] + [p for p in module.parameters() if p.requires_grad]
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return y.detach(), grads


def _assert_same(compiled, eager):
    (y_c, grads_c), (y_e, grads_e) = compiled, eager
    # Same kernels on the same inputs; only Inductor's own code for the loss may round differently.
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    assert len(grads_c) == len(grads_e)
    for i, (g_c, g_e) in enumerate(zip(grads_c, grads_e)):
        assert g_e.abs().max() > 0, f"gradient {i} is zero: the case proves nothing"
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6, msg=f"gradient {i}")


@pytest.mark.parametrize("dropout, path", [(0.1, "fused"), (0.0, "dequant")])
def test_compiled_lora_linear_4bit_matches_eager(dropout, path, kernel_device):
    layer = _layer_4bit(dropout, kernel_device)
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device).requires_grad_()
    with lora_engine.force_path(path):
        eager = _run(layer, x, seed=5)
        compiled_layer = torch.compile(layer, backend=BACKEND, fullgraph=True)
        compiled = _run(compiled_layer, x, seed=5)
        _assert_same(compiled, eager)
        if dropout:
            # the seed is an input of the graph: another torch seed gives other masks, the same seed the same
            again, other = _run(compiled_layer, x, seed=5), _run(compiled_layer, x, seed=6)
            assert torch.equal(again[0], compiled[0]) and not torch.equal(other[0], compiled[0])


def test_no_graph_breaks_in_the_layers(kernel_device):
    layer4 = _layer_4bit(0.1, kernel_device)
    torch.manual_seed(0)
    dense = LoRALinear(37, 29, r=4, lora_dropout=0.1, device=torch.device(kernel_device)).train()
    model = nn.Sequential(layer4, nn.ReLU(), dense)
    x = torch.randn(2, 3, 100, device=kernel_device, requires_grad=True)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = explanation.graphs[0].code
    assert code.count("lora_engine.lora_linear_fwd") == 2, "both layers must run as the registered custom op"


class TwoLayers(nn.Module):
    is_loaded_in_4bit = True

    def __init__(self) -> None:
        import bitsandbytes as bnb

        super().__init__()
        self.q = bnb.nn.Linear4bit(100, 37, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        self.out = nn.Linear(37, 29)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.q(x)))


def _patched_two_layers(config: LoraConfig, device: str):
    """``TwoLayers`` under PEFT with ``config``, lora_B drawn non-zero (so the adapter shows), patched: (model,
    report)."""
    model = get_peft_model(TwoLayers().to(device), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model, lora_engine.patch_peft_model(model)


def test_compiled_patched_peft_model_matches_eager(kernel_device):
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "out"], lora_dropout=0.1)
    model, report = _patched_two_layers(config, kernel_device)
    assert report.num_patched == 2 and not report.fallbacks, str(report)
    model.train()
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device).requires_grad_()

    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()

    compiled_model = torch.compile(model, backend=BACKEND, fullgraph=True)
    _assert_same(_run(compiled_model, x, seed=5), _run(model, x, seed=5))
    # another sequence length: recompiled with a symbolic token count, which the fake implementations take
    x = torch.randn(2, 9, 100, generator=torch.Generator().manual_seed(3)).to(kernel_device).requires_grad_()
    _assert_same(_run(compiled_model, x, seed=6), _run(model, x, seed=6))


def test_compiled_layer_follows_a_changed_backend_and_path(monkeypatch, kernel_device):
    """torch.compile takes the backend and path as constants when it traces, and traces again when a
    ``use_backend`` / ``force_path`` block changes them (it guards on a counter of setting changes)."""
    paths = []
    real_op = custom_ops.lora_linear

    def recording_op(x, weight, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed, path):
        paths.append(path)
        return real_op(x, weight, lora_A, lora_B, bias, scaling, dropout_p, dropout_seed, path)

    monkeypatch.setattr(custom_ops, "lora_linear", recording_op)
    layer = _layer_4bit(0.0, kernel_device).eval()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(5, 100, device=kernel_device)
    with torch.no_grad():
        with lora_engine.force_path("fused"):
            y_fused = compiled(x)
        with lora_engine.force_path("dequant"):
            y_dequant = compiled(x)
        with lora_engine.use_backend("torch"):
            y_torch = compiled(x)
    assert paths == ["fused", "dequant"], "each setting traced once; the torch backend calls no kernel op"
    torch.testing.assert_close(y_fused, y_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_dequant, y_torch, rtol=1e-5, atol=1e-5)


def _ia3_4bit_args(scales_input: bool, device: str):
    layer = _layer_4bit(0.0, device)
    gen = torch.Generator().manual_seed(4)
    scale = (1.0 + 0.3 * torch.randn(100 if scales_input else 37, generator=gen)).to(device).requires_grad_()
    bias = torch.randn(37, generator=gen).to(device).requires_grad_()
    return layer.weight, layer.weight.quant_state, scale, bias


def test_adapter_op_passes_torch_opcheck(kernel_device):
    """The adapter op (IA3's route under torch.compile): schema, fake implementation, autograd, AOT tracing."""
    weight, state, scale, bias = _ia3_4bit_args(False, kernel_device)
    tensors, sizes = custom_ops.weight_parts(packed_4bit(weight, state))
    x = torch.randn(7, 100, generator=torch.Generator().manual_seed(5)).to(kernel_device).requires_grad_()
    args = ("ia3", x, [scale], [], bias, tensors, sizes, [0.0], 0.0, None, "fused", [True])
    torch.library.opcheck(custom_ops.adapter_linear_fwd, args)


def _assert_adapter_op_compiles_as_eager(layer, x: torch.Tensor, leaves: tuple) -> None:
    """``layer`` traces without a graph break into the adapter op, and compiled forward and backward give what
    eager gives for x and every tensor in ``leaves``."""
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert "lora_engine.adapter_linear_fwd" in explanation.graphs[0].code, "it must run as the registered op"
    torch._dynamo.reset()

    def run(fn):
        y = fn(x)
        y.square().sum().backward()
        grads = [t.grad.clone() for t in (x, *leaves)]
        for t in (x, *leaves):
            t.grad = None
        return y.detach(), grads

    eager = run(layer)
    compiled = run(torch.compile(layer, backend=BACKEND, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    for g_c, g_e in zip(compiled[1], eager[1]):
        assert g_e.abs().max() > 0
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scales_input", [True, False], ids=["input_scaled", "output_scaled"])
def test_compiled_ia3_matches_eager_without_graph_breaks(scales_input, kernel_device):
    weight, state, scale, bias = _ia3_4bit_args(scales_input, kernel_device)

    def layer(x):
        return torch.relu(lora_engine.ia3_linear_4bit(x, weight, state, scale, scales_input, bias=bias))

    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device).requires_grad_()
    _assert_adapter_op_compiles_as_eager(layer, x, (scale, bias))


def _lowrank_4bit_args(device: str):
    layer = _layer_4bit(0.0, device)
    gen = torch.Generator().manual_seed(6)
    left = torch.randn(3, 5, 8, generator=gen).to(device).requires_grad_()
    lora_B = (torch.randn(8, 37, generator=gen) * 0.3).to(device).t().requires_grad_()  # lora_B(I)ᵀ's layout
    bias = torch.randn(37, generator=gen).to(device).requires_grad_()
    return layer.weight, layer.weight.quant_state, left, lora_B, bias


def test_lowrank_op_passes_torch_opcheck(kernel_device):
    """The adapter op carrying a given left factor (the route of LoRA modules sharded by FSDP, compiled)."""
    weight, state, left, lora_B, bias = _lowrank_4bit_args(kernel_device)
    tensors, sizes = custom_ops.weight_parts(packed_4bit(weight, state))
    x = torch.randn(15, 100, generator=torch.Generator().manual_seed(5)).to(kernel_device).requires_grad_()
    left2d = left.detach().reshape(15, 8).requires_grad_()
    args = ("lowrank", x, [left2d, lora_B], [], bias, tensors, sizes, [1.5], 0.0, None, "fused", [True, True])
    torch.library.opcheck(custom_ops.adapter_linear_fwd, args)


def test_compiled_lowrank_matches_eager_without_graph_breaks(kernel_device):
    weight, state, left, lora_B, bias = _lowrank_4bit_args(kernel_device)

    def layer(x):
        return torch.relu(lora_engine.lowrank_linear_4bit(x, weight, state, left.tanh(), lora_B, 1.5, bias=bias))

    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device).requires_grad_()
    _assert_adapter_op_compiles_as_eager(layer, x, (left, lora_B, bias))


@pytest.fixture
def dora_calls(monkeypatch):
    """Records each run of DoRA's kernel forward (its dropout) and backward (the saved tensors it got), and counts
    dense decodes of a 4-bit W (the decode paths' and the one that fills the ‖W‖² cache)."""
    kind = autograd.KINDS[Dora]
    calls = {"forward": [], "backward": [], "decodes": 0}
    decode = dequantize.dequantize_4bit

    def counted_decode(*args, **kwargs):
        calls["decodes"] += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(dequantize, "dequantize_4bit", counted_decode)
    monkeypatch.setattr(autograd, "dequantize_4bit", counted_decode)

    def forward(adapter, *args):
        calls["forward"].append(adapter.dropout)
        return kind.forward(adapter, *args)

    def backward(adapter, dy, x, bias, saved, *args):
        calls["backward"].append(saved)
        return kind.backward(adapter, dy, x, bias, saved, *args)

    monkeypatch.setitem(autograd.KINDS, Dora, autograd.KindOps(forward, backward))
    return calls


def _dora_4bit_args(device: str):
    """Nested NF4 W [37, 100] (blocksize 64: blocks straddle rows), rank 4, fp32; A, B, m and the bias trainable."""
    layer = _layer_4bit(0.0, device)
    gen = torch.Generator().manual_seed(6)

    def leaf(*shape, mean=0.0):
        return (mean + torch.randn(*shape, generator=gen)).to(device).requires_grad_()

    return layer.weight, layer.weight.quant_state, leaf(4, 100), leaf(37, 4), leaf(37, mean=5.0), leaf(37)


def test_dora_op_passes_torch_opcheck(kernel_device):
    """The adapter op with DoRA (trainables, ‖W‖² as a constant, a dropout seed, saved tensors), and the norm op."""
    weight, state, lora_A, lora_B, magnitude, bias = _dora_4bit_args(kernel_device)
    tensors, sizes = custom_ops.weight_parts(packed_4bit(weight, state))
    norm_sq = custom_ops.row_norms_sq_op(tensors, sizes)
    torch.library.opcheck(custom_ops.row_norms_sq_op, (tensors, sizes))
    x = torch.randn(7, 100, generator=torch.Generator().manual_seed(5)).to(kernel_device).requires_grad_()
    seed = custom_ops.seed_tensor(3)
    args = ("dora", x, [lora_A, lora_B, magnitude], [norm_sq], bias, tensors, sizes, [1.5], 0.2, seed, "fused")
    torch.library.opcheck(custom_ops.adapter_linear_fwd, args + ([True, True, True],))
    # B and m frozen: the forward returns placeholders for left and the norm, which only dB and dm read
    frozen = [lora_A, lora_B.detach(), magnitude.detach()]
    y, saved = custom_ops.adapter_linear_fwd(*args[:2], frozen, *args[3:], [True, False, False])
    assert [t.shape for t in saved] == [(0,), (37,), (0,)]
    # the fake implementation gives the same placeholders (the full check above covers the rest)
    frozen_args = (*args[:2], frozen, *args[3:], [True, False, False])
    torch.library.opcheck(custom_ops.adapter_linear_fwd, frozen_args, test_utils="test_faketensor")


@pytest.mark.parametrize(
    "dropout, path, frozen",
    [(0.0, "dequant", False), (0.2, "fused", False), (0.2, "dequant", True), (0.2, "dense", False)],
    ids=["p0-dequant", "p0.2-fused", "p0.2-dequant-B_m_frozen", "p0.2-dense"],
)
def test_compiled_dora_matches_eager_through_the_adapter_op(dropout, path, frozen, kernel_device, dora_calls):
    """Compiled DoRA (fullgraph) runs the kernels' forward and backward inside the adapter op, not the reference, and
    gives eager's output and gradients (x, A, B, m, bias) for the same dropout seed. With B and m frozen, the
    forward keeps neither drop(x)·Aᵀ nor the norm for the backward (only dB and dm read them). Path "dense":
    ``dora_linear`` over the decoded W, its ‖W‖² through the same norm op."""
    weight, state, lora_A, lora_B, magnitude, bias = _dora_4bit_args(kernel_device)
    dense = lora_engine.reference.dequantize_4bit(weight, state)
    if frozen:
        lora_B.requires_grad_(False)
        magnitude.requires_grad_(False)
    leaves = [t for t in (lora_A, lora_B, magnitude, bias) if t.requires_grad]

    def layer(x):
        if path == "dense":
            return lora_engine.dora_linear(x, dense, lora_A, lora_B, magnitude, 1.5, bias, dropout, True,
                                           dropout_seed=11)  # fmt: skip
        return lora_engine.dora_linear_4bit(
            x, weight, state, lora_A, lora_B, magnitude, 1.5, bias, dropout, True, dropout_seed=11
        )

    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device).requires_grad_()

    def run(fn):
        dora_calls.update(forward=[], backward=[], decodes=0)
        y = fn(x)
        y.square().sum().backward()
        grads = [t.grad.clone() for t in (x, *leaves)]
        for t in (x, *leaves):
            t.grad = None
        return y.detach(), grads

    with lora_engine.force_path(None if path == "dense" else path):
        eager = run(layer)
        code = torch._dynamo.explain(layer)(x).graphs[0].code
        assert "lora_engine.adapter_linear_fwd" in code and "lora_engine.row_norms_sq" in code, code
        torch._dynamo.reset()
        compiled = run(torch.compile(layer, backend=BACKEND, fullgraph=True))
    # the kernels ran once forward and once backward in the compiled graph (a traced reference would not call them)
    assert len(dora_calls["forward"]) == 1 and len(dora_calls["backward"]) == 1, dora_calls
    (dropout_got,) = dora_calls["forward"]
    assert (dropout_got.seed, dropout_got.p) == (11, 0.2) if dropout else dropout_got is None
    left, scale, norm = dora_calls["backward"][0]
    assert scale is not None and (left is None) == frozen and (norm is None) == frozen
    if path == "fused":  # nothing decodes W densely: ‖W‖² comes from the cache the eager call filled
        assert dora_calls["decodes"] == 0, dora_calls
    _assert_same(compiled, eager)


def test_compiled_patched_peft_dora_matches_eager(kernel_device, dora_calls):
    """A PEFT DoRA layer (lora_dropout in training) over a 4-bit base, patched and compiled: one graph through the
    adapter op, eager's output and gradients (x, A, B, magnitude), the masks drawn from the same torch seed."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q"], use_dora=True, lora_dropout=0.1)
    model, report = _patched_two_layers(config, kernel_device)
    assert report.num_fused == 1 and not report.fallbacks, str(report)
    model.train()
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device).requires_grad_()
    eager = _run(model, x, seed=5)
    dora_calls.update(forward=[], backward=[])
    compiled = _run(torch.compile(model, backend=BACKEND, fullgraph=True), x, seed=5)
    assert len(dora_calls["forward"]) == 1 and len(dora_calls["backward"]) == 1, dora_calls
    assert dora_calls["forward"][0] is not None, "the compiled layer ran without dropout"
    _assert_same(compiled, eager)


def test_base_only_op_passes_torch_opcheck(kernel_device):
    """The op of a 4-bit layer without an adapter: schema, fake implementation, autograd (dx and dbias)."""
    layer = _layer_4bit(0.0, kernel_device)
    tensors, sizes = custom_ops.weight_parts(packed_4bit(layer.weight, layer.weight.quant_state))
    gen = torch.Generator().manual_seed(0)
    x, bias = (torch.randn(*shape, generator=gen).to(kernel_device).requires_grad_() for shape in ((7, 100), (37,)))
    torch.library.opcheck(custom_ops.linear_4bit_fwd, (x, bias, tensors, sizes, "dequant"))
    torch.library.opcheck(custom_ops.linear_4bit_fwd, (x, None, tensors, sizes, "dequant_cublas"))


def test_compiled_patched_4bit_model_matches_eager(kernel_device):
    """A 4-bit model without PEFT through patch_model: one graph, the base-only op in it, eager's results."""
    torch.manual_seed(0)
    model = TwoLayers().to(kernel_device)
    report = lora_engine.patch_model(model)
    assert report.base_patched == ["q"] and not report.base_fallbacks, str(report)
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(2)).to(kernel_device).requires_grad_()
    eager = _run(model, x, seed=5)  # the first call sets the compute dtype, as bitsandbytes' forward does

    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graphs[0].code.count("lora_engine.linear_4bit_fwd") == 1
    torch._dynamo.reset()

    compiled_model = torch.compile(model, backend=BACKEND, fullgraph=True)
    _assert_same(_run(compiled_model, x, seed=5), eager)  # gradients of x, q's bias and out's weights


MIXED_RANKS, MIXED_SCALINGS = (4, 8), [2.0, 0.5]


def _mixed_batch(device: str):
    """A nested NF4 weight [37, 75] (K odd: blocks straddle rows), adapters of ranks 4 and 8, fp32 leaves, and the
    adapter of each of 7 rows: both adapters and the base alone, interleaved."""
    gen = torch.Generator().manual_seed(11)
    n, k = 37, 75
    weight, state = bnbF.quantize_4bit(
        (torch.randn(n, k, generator=gen) * 0.5).to(device), blocksize=32, quant_type="nf4", compress_statistics=True
    )

    def leaf(*shape, std=0.3):
        return (torch.randn(*shape, generator=gen) * std).to(device).requires_grad_()

    lora_As, lora_Bs = [leaf(r, k) for r in MIXED_RANKS], [leaf(n, r) for r in MIXED_RANKS]
    x, bias = leaf(7, k, std=1.0), leaf(n, std=1.0)
    return x, weight, state, lora_As, lora_Bs, bias, torch.tensor([1, -1, 0, 1, 0, -1, 1])


def test_compiled_mixed_batch_matches_eager(kernel_device):
    """A mixed batch compiled whole (fullgraph) runs as the registered op: the eager kernels' output and gradients
    (x, bias, every A_i and B_i), and out-of-range indices still raise, checked in the graph on the device."""
    x, weight, state, lora_As, lora_Bs, bias, indices = _mixed_batch(kernel_device)

    def layer(x, indices):
        return lora_engine.multi_lora_linear_4bit(x, weight, state, lora_As, lora_Bs, MIXED_SCALINGS, indices, bias)

    leaves = (x, bias, *lora_As, *lora_Bs)

    def run(fn):
        y = fn(x, indices)
        y.square().sum().backward()
        grads = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        return y.detach(), grads

    eager = run(layer)
    counter = CompileCounterWithBackend(BACKEND)
    compiled_layer = torch.compile(layer, backend=counter, fullgraph=True)
    compiled = run(compiled_layer)
    assert counter.frame_count == 1
    # the reference traced instead would agree within these tolerances too: the op must be in the graph
    assert counter.graphs[0].code.count("lora_engine.multi_lora_linear_fwd") == 1, counter.graphs[0].code
    _assert_same(compiled, eager)
    with pytest.raises(RuntimeError, match=r"adapter_indices must lie in \[-1, 2\)"):
        compiled_layer(x, torch.tensor([1, -1, 0, 2, 0, -1, 1]))
    assert counter.frame_count == 1, "new index values must not retrace"


def test_mixed_batch_op_passes_torch_opcheck(kernel_device):
    """The mixed-batch op: schema, fake implementation, autograd with one factor of each list frozen (it gets no
    gradient), AOT tracing with dynamic shapes; and its inference form over a base output computed by the caller."""
    x, weight, state, lora_As, lora_Bs, bias, indices = _mixed_batch(kernel_device)
    lora_As[1].requires_grad_(False)
    lora_Bs[0].requires_grad_(False)
    tensors, sizes = custom_ops.weight_parts(packed_4bit(weight, state))
    indices = indices.to(kernel_device)
    args = (x, None, bias, tensors, sizes, lora_As, lora_Bs, MIXED_SCALINGS, indices, "dequant")
    torch.library.opcheck(custom_ops.multi_lora_linear_fwd, args)
    with torch.no_grad():
        base = lora_engine.linear_4bit(x, weight, state, bias)
        detached = [[t.detach() for t in factors] for factors in (lora_As, lora_Bs)]
        args = (x.detach(), base, None, tensors, sizes, *detached, MIXED_SCALINGS, indices, "dequant")
        torch.library.opcheck(custom_ops.multi_lora_linear_fwd, args)


def test_compiled_mixed_batch_adds_to_a_bitsandbytes_base(kernel_device, monkeypatch):
    """Inference where the base-only path table picks bitsandbytes (CUDA at small token counts; forced here): the base
    product is bitsandbytes' op in the graph, as eager runs it, and the mixed op adds the low-rank terms to it."""
    x, weight, state, lora_As, lora_Bs, bias, indices = _mixed_batch(kernel_device)
    resolve = lora_engine.functional._resolve_path

    def bitsandbytes_base(num_tokens, packed, device, base_only=False):
        return "bitsandbytes" if base_only else resolve(num_tokens, packed, device)

    monkeypatch.setattr(lora_engine.functional, "_resolve_path", bitsandbytes_base)

    def layer(x):
        return lora_engine.multi_lora_linear_4bit(x, weight, state, lora_As, lora_Bs, MIXED_SCALINGS, indices, bias)

    counter = CompileCounterWithBackend("eager")  # the routing is Dynamo's; the op's base form passes opcheck above
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend=counter, fullgraph=True)(x)
    code = counter.graphs[0].code
    assert "bitsandbytes.gemm_4bit" in code and code.count("lora_engine.multi_lora_linear_fwd") == 1, code
    assert torch.equal(compiled, eager)

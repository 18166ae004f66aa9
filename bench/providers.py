"""What the layer benchmark times: our layer (dispatcher and each path) and the anchors, on shared inputs.

Every provider is built from the same ``LayerInputs`` (one quantized weight, one x, one LoRA pair, one dy) and
timed in the same process. The LoRA providers compute the same layer; ``dense_bf16`` and the base-only ones
(``bnb_base``, ``lora_engine_base*``) the same layer without its LoRA term.

    lora_engine                  LoRALinear4bit.from_bnb over the bnb layer; the dispatcher picks the path
    lora_engine[<path>]          the functional API with the path forced (fused, dequant, dequant_cublas, gemv;
                                 gemv only where it serves the call: at most 16 tokens, K a multiple of the
                                 blocksize)
    bnb_peft                     bitsandbytes Linear4bit wrapped by PEFT's LoRA layer (eager)
    dequant_cublas               bnb dequantize_4bit into a fresh tensor, cuBLAS GEMM, addmm LoRA; backward
                                 decodes again (the algorithm Unsloth uses)
    dense_bf16                   cuBLAS on the already-decoded weight, no LoRA (the floor)
    torch_reference              lora_engine.reference (pure torch, fp32 accumulation)
    bnb_base                     bitsandbytes' Linear4bit alone, no adapter (the base-only anchor)
    lora_engine_base[<path>]     lora_engine.linear_4bit, no adapter: the dispatcher's choice, or a path forced
    gemlite                      where the package is installed (not a dependency): GemLite's Triton 4-bit
                                 GEMV/GEMM on the same dense weight quantized again, group-wise int4 with
                                 group 64, no LoRA, no backward. Not the same format nor the same function: a
                                 reference point for the speed of a Triton 4-bit kernel

Adapter kinds on the same 4-bit base, ours beside stock PEFT's over bnb.nn.Linear4bit, built from the case's
weight, x and dy; their other operands are drawn from the case's seed (``multi_adapters``, ``dora_magnitude``,
``ia3_scale``). Ours run as users run them: the module, or the functional entry a patched PEFT layer calls.

    lora_engine_multi8           a mixed batch: LoRALinear4bit holding 8 named adapters, called as
                                 ``layer(x, adapter_indices=idx)`` with idx on the host; ranks 16, 8, 16, 32, 16,
                                 8, 16, 16 (mean 16, the single adapter's), scaling 32 / r, row m of x through
                                 adapter m mod 8. decode and fwd only: PEFT's mixed batch is inference only
                                 (``model(..., adapter_names=...)`` refuses training mode)
    peft_multi8                  the same adapters in PEFT's LoRA Linear4bit, ``layer(x, adapter_names=names)``:
                                 what ``model(..., adapter_names=names)`` runs in each layer
    lora_engine_dora             ``lora_engine.dora_linear_4bit`` with the case's LoRA pair (r=16) and a magnitude;
                                 fwd and fwdbwd (gradients for x, A, B and the magnitude)
    peft_dora                    PEFT's LoRA Linear4bit with ``use_dora=True``, the same operands
    lora_engine_dora_dense,      the same two over an ``nn.Linear`` holding the decoded weight (``dense_bf16``'s
      peft_dora_dense            operand): ``lora_engine.dora_linear`` and PEFT's LoRA Linear with ``use_dora=True``
    lora_engine_ia3              ``lora_engine.ia3_linear_4bit`` scaling the output (PEFT's attention layers) by an
                                 fp32 vector, as PEFT keeps it; fwd, fwdbwd and decode (gradients for x and it)
    peft_ia3                     PEFT's IA3 Linear4bit, the same vector (its output is fp32 for a bf16 input)
    lora_engine_ia3_ff,          the same two with the vector scaling the input (PEFT's ``feedforward_modules``)
      peft_ia3_ff

A kind asked for a mode it does not run (``KIND_MODES``) builds nothing, and the case goes on without it. The
report sets each kind's time against its baseline's (``KIND_RATIOS``): ours against ``lora_engine`` (the mixed
batch, DoRA) or ``lora_engine_base`` (IA3), PEFT's against ``bnb_peft`` or ``bnb_base``. The group ``kinds``
(``PROVIDER_GROUPS``) names the kinds and their baselines; on a GPU this command writes the ratios side by side,
in one table, to ``bench/results/<gpu>/kinds.md``:

    python -m bench --providers kinds --modes decode fwd fwdbwd --m-decode 16 --m-train 256 8192 --stem kinds

The benchmark times every provider both eagerly and replayed from a CUDA graph (``bench/measure.py``), so no
provider needs a graphed variant of its own.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lora_engine import dispatch

MODES = ("fwd", "fwdbwd", "decode")
RANK = 16
LORA_ALPHA = 32
PATH_PROVIDERS = tuple(f"lora_engine[{p}]" for p in dispatch.PATHS)
ANCHORS = ("bnb_peft", "dequant_cublas", "dense_bf16")
# A 4-bit layer without an adapter (x·deq(W)ᵀ, what `lora_engine.linear_4bit` computes): bitsandbytes' own
# Linear4bit, our dispatcher's choice, and each of our paths forced. They decide the dispatcher's base-only table
# (`dispatch.BASE_PATH_STEPS`); not in the default set (`--providers` names them).
BASE_ANCHOR = "bnb_base"
BASE_PROVIDERS = (BASE_ANCHOR, "lora_engine_base", *(f"lora_engine_base[{p}]" for p in dispatch.PATHS))
# Providers of another weight format, each from a package of its own that this project does not depend on:
# {provider: the package it needs}. They compute a different function, so the same-layer checks leave them out.
OTHER_FORMATS = {"gemlite": "gemlite"}
GEMLITE_GROUP = 64  # int4 group size given to GemLite, the blocksize of our NF4 weights


def installed(provider: str) -> bool:
    """Whether the package a provider of another format needs is installed (found, not imported: importing
    GemLite initializes CUDA)."""
    package = OTHER_FORMATS.get(provider)
    return package is None or importlib.util.find_spec(package) is not None


# Adapter kinds over the same 4-bit base, ours and PEFT's (see the module docstring); not in the default set.
MULTI_RANKS = (16, 8, 16, 32, 16, 8, 16, 16)  # the mixed batch's adapters: mean 16 (the single adapter's rank)
MULTI_NAMES = tuple(f"adapter{i}" for i in range(len(MULTI_RANKS)))
KIND_PROVIDERS = ("lora_engine_multi8", "peft_multi8", "lora_engine_dora", "peft_dora", "lora_engine_dora_dense",
                  "peft_dora_dense", "lora_engine_ia3", "peft_ia3", "lora_engine_ia3_ff", "peft_ia3_ff")  # fmt: skip
# The modes each kind runs (the others: all three). PEFT's mixed batch is inference only; DoRA is measured where it
# trains (its kernels have no few-token path: the gemv path takes the dequant route).
KIND_MODES = {
    "lora_engine_multi8": ("fwd", "decode"),
    "peft_multi8": ("fwd", "decode"),
    "lora_engine_dora": ("fwd", "fwdbwd"),
    "peft_dora": ("fwd", "fwdbwd"),
    "lora_engine_dora_dense": ("fwd", "fwdbwd"),
    "peft_dora_dense": ("fwd", "fwdbwd"),
}
# (provider, its baseline, the most its time may be over the baseline's where the project sets a target, or None):
# what each adapter kind costs over the same layer without it, ours and PEFT's.
KIND_RATIOS = (
    ("lora_engine_multi8", "lora_engine", 1.3),
    ("peft_multi8", "bnb_peft", None),
    ("lora_engine_dora", "lora_engine", 1.3),
    ("peft_dora", "bnb_peft", None),
    ("lora_engine_dora_dense", "dense_bf16", None),
    ("peft_dora_dense", "dense_bf16", None),
    ("lora_engine_ia3", "lora_engine_base", 1.05),
    ("peft_ia3", BASE_ANCHOR, None),
    ("lora_engine_ia3_ff", "lora_engine_base", 1.05),
    ("peft_ia3_ff", BASE_ANCHOR, None),
)
ADAPTER_KINDS_NOTE = (
    f"Adapter kinds: `*_multi8` {len(MULTI_RANKS)} LoRA adapters of ranks {', '.join(map(str, MULTI_RANKS))} "
    f"(scaling {LORA_ALPHA} / r), row m of x through adapter m mod {len(MULTI_RANKS)}; `*_dora` DoRA r={RANK} "
    "(`*_dora_dense` over the decoded weight in an nn.Linear); `*_ia3` IA3 scaling the output, `*_ia3_ff` the input "
    "(PEFT's feed-forward layers), an fp32 vector. The targets hold for the mixed batch at M = 16 and 256, for DoRA "
    "in fwdbwd at M = 8192, for IA3 at every M."
)
# Names standing for several providers on the command line.
PROVIDER_GROUPS = {"kinds": ("lora_engine", "bnb_peft", "lora_engine_base", BASE_ANCHOR, "dense_bf16", *KIND_PROVIDERS)}

DEFAULT_PROVIDERS = ("lora_engine", *PATH_PROVIDERS, *ANCHORS, *(p for p in OTHER_FORMATS if installed(p)))
ALL_PROVIDERS = ("lora_engine", *PATH_PROVIDERS, *ANCHORS, "torch_reference", *BASE_PROVIDERS, *OTHER_FORMATS,
                 *KIND_PROVIDERS)  # fmt: skip


def expand_providers(names: list[str]) -> list[str]:
    """Provider names with each group (``PROVIDER_GROUPS``) replaced by its members, each name once, in order."""
    return list(dict.fromkeys(p for name in names for p in PROVIDER_GROUPS.get(name, (name,))))


class ProviderUnavailable(RuntimeError):
    """A provider of another format whose package is missing or cannot be imported here."""


def unavailable(provider: str) -> Optional[str]:
    """Why ``provider`` cannot run on this machine (its package is not installed), or None."""
    if installed(provider):
        return None
    package = OTHER_FORMATS[provider]
    return (f"provider {provider!r} needs the {package} package, which is not installed (pip install {package}; "
            "it is not a dependency of this project and needs a CUDA GPU)")  # fmt: skip


@dataclass
class LayerInputs:
    """One layer's operands, shared by every provider."""

    n: int
    k: int
    m: int
    dtype: torch.dtype
    weight: torch.nn.Parameter  # bitsandbytes Params4bit, NF4 + double quant, blocksize 64
    dense: torch.Tensor  # the decoded weight (the dense anchor's operand)
    x: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    dy: torch.Tensor
    scaling: float = LORA_ALPHA / RANK

    @property
    def weight_bytes(self) -> int:
        """Bytes of the 4-bit weight a forward must read: packed codes plus the (nested) absmax."""
        state = self.weight.quant_state
        absmax = state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            absmax += state.state2.absmax.numel() * 4
        return self.weight.numel() * self.weight.element_size() + absmax


def make_inputs(n: int, k: int, m: int, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> LayerInputs:
    """Random operands with LLM-like scales (W ~ N(0, 0.02), x ~ N(0, 1)), seeded by the shape."""
    import bitsandbytes.functional as bnbF

    from lora_engine.format import quantize_weight

    gen = torch.Generator(device=device).manual_seed(n * 7919 + k * 31 + m)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    weight = quantize_weight(randn(n, k, std=0.02), quant_type="nf4", blocksize=64, compress_statistics=True)
    dense = bnbF.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return LayerInputs(
        n, k, m, dtype, weight, dense,
        x=randn(m, k), lora_A=randn(RANK, k, std=k**-0.5), lora_B=randn(n, RANK, std=0.01), dy=randn(m, n),
    )  # fmt: skip


@dataclass
class Runnable:
    """A zero-argument call to time, and the leaves whose grads are reset between calls."""

    fn: Callable[[], object]
    grad_leaves: tuple[torch.Tensor, ...] = ()


def _leaves(t: LayerInputs, mode: str, *, lora: bool = True) -> tuple[torch.Tensor, ...]:
    """Fresh leaves for x (and A, B): requiring grad in fwdbwd, plain tensors otherwise."""
    grad = mode == "fwdbwd"
    tensors = (t.x, t.lora_A, t.lora_B) if lora else (t.x,)
    return tuple(v.detach().clone().requires_grad_(grad) for v in tensors)


def _wrap(forward: Callable[[], torch.Tensor], mode: str, dy: torch.Tensor, leaves) -> Runnable:
    if mode == "fwdbwd":

        def step() -> None:
            forward().backward(dy)

        return Runnable(step, tuple(leaves))

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return forward()

    return Runnable(infer)


def _bnb_base(t: LayerInputs) -> torch.nn.Module:
    import bitsandbytes as bnb

    base = bnb.nn.Linear4bit(t.k, t.n, bias=False, compute_dtype=t.dtype, quant_type="nf4", device="meta")
    base.weight = t.weight  # share the one quantized weight
    return base


def _lora_engine_module(t: LayerInputs, mode: str) -> Runnable:
    import lora_engine

    layer = lora_engine.LoRALinear4bit.from_bnb(_bnb_base(t), r=RANK, lora_alpha=LORA_ALPHA, lora_dtype=t.dtype)
    x, lora_A, lora_B = _leaves(t, mode)
    layer.lora_A.data.copy_(lora_A.detach())
    layer.lora_B.data.copy_(lora_B.detach())
    layer.train(mode == "fwdbwd")
    x.requires_grad_(mode == "fwdbwd")
    return _wrap(lambda: layer(x), mode, t.dy, (x, layer.lora_A, layer.lora_B))


def _lora_engine_path(path: str) -> Callable[[LayerInputs, str], Optional[Runnable]]:
    def build(t: LayerInputs, mode: str) -> Optional[Runnable]:
        import lora_engine
        from lora_engine.format import packed_4bit
        from lora_engine.kernels.lora_gemv import gemv_supported

        if path == "gemv" and not gemv_supported(t.m, packed_4bit(t.weight, t.weight.quant_state)):
            return None  # the call would take the dequant path: not a gemv measurement

        x, lora_A, lora_B = _leaves(t, mode)
        state = t.weight.quant_state

        def forward() -> torch.Tensor:
            with lora_engine.force_path(path):
                return lora_engine.lora_linear_4bit(x, t.weight, state, lora_A, lora_B, t.scaling)

        return _wrap(forward, mode, t.dy, (x, lora_A, lora_B))

    return build


def _bnb_peft(t: LayerInputs, mode: str) -> Runnable:
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0)
    layer = PeftLinear4bit(_bnb_base(t), "default", config, r=RANK, lora_alpha=LORA_ALPHA)
    layer.to(device=t.x.device)
    x, lora_A, lora_B = _leaves(t, mode)
    layer.lora_A["default"].weight = torch.nn.Parameter(lora_A.detach(), requires_grad=mode == "fwdbwd")
    layer.lora_B["default"].weight = torch.nn.Parameter(lora_B.detach(), requires_grad=mode == "fwdbwd")
    return _wrap(lambda: layer(x), mode, t.dy, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight))


class _DequantCublasLoRA(torch.autograd.Function):
    """Decode W to a fresh dense tensor, cuBLAS GEMM, LoRA by addmm; backward decodes W again."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, weight, scaling):
        import bitsandbytes.functional as bnbF

        w = bnbF.dequantize_4bit(weight.data, weight.quant_state)
        xa = x @ lora_A.t()
        y = x @ w.t()
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.weight, ctx.scaling = weight, scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        import bitsandbytes.functional as bnbF

        x, lora_A, lora_B, xa = ctx.saved_tensors
        s = ctx.scaling
        w = bnbF.dequantize_4bit(ctx.weight.data, ctx.weight.quant_state)
        dyb = dy @ lora_B
        dx = dy @ w
        dx.addmm_(dyb, lora_A, alpha=s)
        d_lora_A = (dyb.t() @ x).mul_(s)
        d_lora_B = (dy.t() @ xa).mul_(s)
        return dx, d_lora_A, d_lora_B, None, None


def _dequant_cublas(t: LayerInputs, mode: str) -> Runnable:
    x, lora_A, lora_B = _leaves(t, mode)
    forward = lambda: _DequantCublasLoRA.apply(x, lora_A, lora_B, t.weight, t.scaling)  # noqa: E731
    return _wrap(forward, mode, t.dy, (x, lora_A, lora_B))


def _dense_bf16(t: LayerInputs, mode: str) -> Runnable:
    (x,) = _leaves(t, mode, lora=False)
    return _wrap(lambda: x @ t.dense.t(), mode, t.dy, (x,))


def _torch_reference(t: LayerInputs, mode: str) -> Runnable:
    from lora_engine import reference

    x, lora_A, lora_B = _leaves(t, mode)
    state = t.weight.quant_state
    forward = lambda: reference.lora_linear_4bit(x, t.weight, state, lora_A, lora_B, t.scaling)  # noqa: E731
    return _wrap(forward, mode, t.dy, (x, lora_A, lora_B))


def _bnb_base_only(t: LayerInputs, mode: str) -> Runnable:
    """bitsandbytes' Linear4bit alone, no adapter (its GEMV at one token, decode + cuBLAS above)."""
    layer = _bnb_base(t)
    (x,) = _leaves(t, mode, lora=False)
    return _wrap(lambda: layer(x), mode, t.dy, (x,))


def _lora_engine_base(path: Optional[str]) -> Callable[[LayerInputs, str], Optional[Runnable]]:
    """``lora_engine.linear_4bit``: the dispatcher's base-only choice (``path`` None) or one path forced."""

    def build(t: LayerInputs, mode: str) -> Optional[Runnable]:
        import lora_engine
        from lora_engine.format import packed_4bit
        from lora_engine.kernels.lora_gemv import gemv_supported

        if path == "gemv" and not gemv_supported(t.m, packed_4bit(t.weight, t.weight.quant_state)):
            return None  # the call would take the dequant path: not a gemv measurement
        (x,) = _leaves(t, mode, lora=False)
        state = t.weight.quant_state

        def forward() -> torch.Tensor:
            if path is None:
                return lora_engine.linear_4bit(x, t.weight, state)
            with lora_engine.force_path(path):
                return lora_engine.linear_4bit(x, t.weight, state)

        return _wrap(forward, mode, t.dy, (x,))

    return build


def _kind_generator(t: LayerInputs, stream: int) -> torch.Generator:
    """A generator seeded by the case, one ``stream`` per kind of operand (make_inputs' draws stay as they were)."""
    seed = t.n * 7919 + t.k * 31 + t.m + 1_000_003 * stream
    return torch.Generator(device=t.x.device).manual_seed(seed)


def multi_adapters(t: LayerInputs) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """The mixed batch's adapters, ``(A (r, K), B (N, r), scaling)`` with the ranks ``MULTI_RANKS`` and scaling
    ``LORA_ALPHA / r`` (PEFT's), at the scales of the case's own pair, in its dtype."""
    gen = _kind_generator(t, 1)
    adapters = []
    for r in MULTI_RANKS:
        lora_A = torch.randn(r, t.k, generator=gen, device=t.x.device) * t.k**-0.5
        lora_B = torch.randn(t.n, r, generator=gen, device=t.x.device) * 0.01
        adapters.append((lora_A.to(t.dtype), lora_B.to(t.dtype), LORA_ALPHA / r))
    return adapters


def multi_adapter_indices(m: int) -> list[int]:
    """The adapter of each row of the mixed batch: row i through adapter i mod 8, so the rows of one adapter are not
    adjacent (the kernels group them) and no adapter has more than one row more than another."""
    return [i % len(MULTI_RANKS) for i in range(m)]


def dora_magnitude(t: LayerInputs) -> torch.Tensor:
    """DoRA's magnitude (N,) in the case's dtype: the row norms of deq(W) + s·B·A (PEFT's initial value) moved by
    about 10%, so that the rescaling m / ‖W + s·B·A‖ is not the identity."""
    delta = t.scaling * (t.lora_B.float() @ t.lora_A.float())
    norm = torch.linalg.norm(t.dense.float() + delta, dim=1)
    noise = torch.randn(t.n, generator=_kind_generator(t, 2), device=t.x.device)
    return (norm * (1 + 0.1 * noise)).to(t.dtype)


def ia3_scale(t: LayerInputs, scales_input: bool) -> torch.Tensor:
    """IA3's vector, fp32 as PEFT creates it: (K,) scaling the input, else (N,); about 1 ± 0.1 (PEFT starts at 1)."""
    features = t.k if scales_input else t.n
    return 1 + 0.1 * torch.randn(features, generator=_kind_generator(t, 3), device=t.x.device)


def _lora_engine_multi(t: LayerInputs, mode: str) -> Runnable:
    """``LoRALinear4bit`` holding the 8 adapters, called on the mixed batch as a user calls it."""
    import lora_engine

    rank0, alpha = MULTI_RANKS[0], LORA_ALPHA
    layer = lora_engine.LoRALinear4bit.from_bnb(
        _bnb_base(t), r=rank0, lora_alpha=alpha, lora_dtype=t.dtype, adapter_name=MULTI_NAMES[0]
    )
    for name, r in zip(MULTI_NAMES[1:], MULTI_RANKS[1:]):
        layer.add_adapter(name, r, alpha)
    for name, (lora_A, lora_B, _) in zip(MULTI_NAMES, multi_adapters(t)):
        weights = layer.get_adapter(name)
        weights.lora_A.data.copy_(lora_A)
        weights.lora_B.data.copy_(lora_B)
    layer.eval()
    # on the host, as the patched PEFT layer builds them from adapter_names (range-checked there, not on the device)
    indices = torch.tensor(multi_adapter_indices(t.m))
    (x,) = _leaves(t, mode, lora=False)
    return _wrap(lambda: layer(x, adapter_indices=indices), mode, t.dy, (x,))


def _peft_multi(t: LayerInputs, mode: str) -> Runnable:
    """PEFT's LoRA Linear4bit holding the 8 adapters, called with one adapter name per row (PEFT's mixed batch)."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    def config(r: int) -> LoraConfig:
        return LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=0.0)

    rank0 = MULTI_RANKS[0]
    layer = PeftLinear4bit(_bnb_base(t), MULTI_NAMES[0], config(rank0), r=rank0, lora_alpha=LORA_ALPHA)
    for name, r in zip(MULTI_NAMES[1:], MULTI_RANKS[1:]):
        layer.update_layer(name, r, lora_alpha=LORA_ALPHA, config=config(r))
    layer.to(device=t.x.device)
    for name, (lora_A, lora_B, _) in zip(MULTI_NAMES, multi_adapters(t)):
        layer.lora_A[name].weight = torch.nn.Parameter(lora_A, requires_grad=False)
        layer.lora_B[name].weight = torch.nn.Parameter(lora_B, requires_grad=False)
    layer.eval()
    names = [MULTI_NAMES[i] for i in multi_adapter_indices(t.m)]
    (x,) = _leaves(t, mode, lora=False)
    return _wrap(lambda: layer(x, adapter_names=names), mode, t.dy, (x,))


def _lora_engine_dora(t: LayerInputs, mode: str) -> Runnable:
    import lora_engine

    x, lora_A, lora_B = _leaves(t, mode)
    magnitude = dora_magnitude(t).requires_grad_(mode == "fwdbwd")
    state = t.weight.quant_state

    def forward() -> torch.Tensor:
        return lora_engine.dora_linear_4bit(x, t.weight, state, lora_A, lora_B, magnitude, t.scaling)

    return _wrap(forward, mode, t.dy, (x, lora_A, lora_B, magnitude))


def _lora_engine_dora_dense(t: LayerInputs, mode: str) -> Runnable:
    import lora_engine

    x, lora_A, lora_B = _leaves(t, mode)
    magnitude = dora_magnitude(t).requires_grad_(mode == "fwdbwd")

    def forward() -> torch.Tensor:
        return lora_engine.dora_linear(x, t.dense, lora_A, lora_B, magnitude, t.scaling)

    return _wrap(forward, mode, t.dy, (x, lora_A, lora_B, magnitude))


def _peft_dora(t: LayerInputs, mode: str, dense: bool = False) -> Runnable:
    """PEFT's DoRA layer over the 4-bit base (lora.Linear4bit), or over an nn.Linear holding the decoded weight."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    from peft.tuners.lora.layer import Linear as PeftLinear

    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, use_dora=True)
    if dense:
        base = torch.nn.Linear(t.k, t.n, bias=False, device=t.x.device, dtype=t.dtype)
        base.weight = torch.nn.Parameter(t.dense, requires_grad=False)
        layer = PeftLinear(base, "default", config, r=RANK, lora_alpha=LORA_ALPHA)
    else:
        layer = PeftLinear4bit(_bnb_base(t), "default", config, r=RANK, lora_alpha=LORA_ALPHA)
    layer.to(device=t.x.device)
    grad = mode == "fwdbwd"
    x, lora_A, lora_B = _leaves(t, mode)
    layer.lora_A["default"].weight = torch.nn.Parameter(lora_A.detach(), requires_grad=grad)
    layer.lora_B["default"].weight = torch.nn.Parameter(lora_B.detach(), requires_grad=grad)
    magnitude = layer.lora_magnitude_vector["default"]
    magnitude.weight = torch.nn.Parameter(dora_magnitude(t), requires_grad=grad)
    layer.train(grad)
    leaves = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight, magnitude.weight)
    return _wrap(lambda: layer(x), mode, t.dy, leaves)


def _lora_engine_ia3(scales_input: bool) -> Callable[[LayerInputs, str], Runnable]:
    """``lora_engine.ia3_linear_4bit`` (what a patched PEFT IA3 layer calls) with the vector scaling the input or the
    output."""

    def build(t: LayerInputs, mode: str) -> Runnable:
        import lora_engine

        (x,) = _leaves(t, mode, lora=False)
        scale = ia3_scale(t, scales_input).requires_grad_(mode == "fwdbwd")
        state = t.weight.quant_state

        def forward() -> torch.Tensor:
            return lora_engine.ia3_linear_4bit(x, t.weight, state, scale, scales_input)

        return _wrap(forward, mode, t.dy, (x, scale))

    return build


def _peft_ia3(scales_input: bool) -> Callable[[LayerInputs, str], Runnable]:
    """PEFT's IA3 Linear4bit (``is_feedforward``: the vector scales the input) with the same vector. Its output is
    float32 for a 16-bit input outside autocast: PEFT upcasts x before the base layer."""

    def build(t: LayerInputs, mode: str) -> Runnable:
        from peft import IA3Config
        from peft.tuners.ia3.bnb import Linear4bit as PeftIA3Linear4bit

        layer = PeftIA3Linear4bit(_bnb_base(t), "default", IA3Config(), is_feedforward=scales_input)
        layer.to(device=t.x.device)
        grad = mode == "fwdbwd"
        shape = (1, t.k) if scales_input else (t.n, 1)  # PEFT's layout of the vector
        layer.ia3_l["default"] = torch.nn.Parameter(ia3_scale(t, scales_input).reshape(shape), requires_grad=grad)
        layer.train(grad)
        (x,) = _leaves(t, mode, lora=False)
        return _wrap(lambda: layer(x), mode, t.dy, (x, layer.ia3_l["default"]))

    return build


def int4_groupwise(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 of ``weight`` (N, K) in HQQ's convention, which GemLite packs:
    ``W ≈ (W_q - zeros) * scales`` with ``W_q`` uint8 in [0, 15] of shape (N, K) and ``scales``, ``zeros`` of shape
    (N, K / group), each group of ``group`` consecutive values along K spanning its min to max."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scales = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)  # a constant group has no range
    zeros = -low / scales
    w_q = (groups / scales + zeros).round_().clamp_(0, 15).to(torch.uint8)
    return w_q.reshape(n, k), scales.reshape(n, -1), zeros.reshape(n, -1)


def _gemlite(t: LayerInputs, mode: str) -> Optional[Runnable]:
    """GemLite's A16W4 layer (HQQ-style int4, group 64) on the same dense weight, x @ W_int4^T without LoRA."""
    if mode == "fwdbwd" or t.k % GEMLITE_GROUP:
        return None  # inference kernels, no backward; groups must tile K
    try:
        from gemlite.helper import A16W4_HQQ_INT
    except Exception as exc:  # not installed, or its import needs CUDA (it queries the device when imported)
        reason = unavailable("gemlite") or f"gemlite failed to import: {type(exc).__name__}: {exc}"
        raise ProviderUnavailable(reason) from exc

    w_q, scales, zeros = int4_groupwise(t.dense, GEMLITE_GROUP)
    layer = A16W4_HQQ_INT(device=t.x.device, dtype=t.dtype).from_weights(w_q, scales.to(t.dtype), zeros.to(t.dtype))
    (x,) = _leaves(t, mode, lora=False)
    return _wrap(lambda: layer(x), mode, t.dy, ())


BUILDERS: dict[str, Callable[[LayerInputs, str], Optional[Runnable]]] = {
    "lora_engine": _lora_engine_module,
    **{f"lora_engine[{p}]": _lora_engine_path(p) for p in dispatch.PATHS},
    "bnb_peft": _bnb_peft,
    "dequant_cublas": _dequant_cublas,
    "dense_bf16": _dense_bf16,
    "torch_reference": _torch_reference,
    BASE_ANCHOR: _bnb_base_only,
    "lora_engine_base": _lora_engine_base(None),
    **{f"lora_engine_base[{p}]": _lora_engine_base(p) for p in dispatch.PATHS},
    "gemlite": _gemlite,
    "lora_engine_multi8": _lora_engine_multi,
    "peft_multi8": _peft_multi,
    "lora_engine_dora": _lora_engine_dora,
    "peft_dora": _peft_dora,
    "lora_engine_dora_dense": _lora_engine_dora_dense,
    "peft_dora_dense": lambda t, mode: _peft_dora(t, mode, dense=True),
    "lora_engine_ia3": _lora_engine_ia3(scales_input=False),
    "peft_ia3": _peft_ia3(scales_input=False),
    "lora_engine_ia3_ff": _lora_engine_ia3(scales_input=True),
    "peft_ia3_ff": _peft_ia3(scales_input=True),
}
assert set(BUILDERS) == set(ALL_PROVIDERS)


def build(provider: str, inputs: LayerInputs, mode: str) -> Optional[Runnable]:
    """The runnable for ``provider`` in ``mode``, or None where it does not apply (the gemv path on a call it does
    not serve, GemLite in fwdbwd, an adapter kind in a mode outside ``KIND_MODES``). Raises
    :class:`ProviderUnavailable` for a provider whose package is missing."""
    if provider not in BUILDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(ALL_PROVIDERS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    reason = unavailable(provider)
    if reason is not None:
        raise ProviderUnavailable(reason)
    if mode not in KIND_MODES.get(provider, MODES):
        return None
    return BUILDERS[provider](inputs, mode)

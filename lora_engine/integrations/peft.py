"""Run PEFT's own LoRA and IA3 layers, and every other bitsandbytes 4-bit layer, through lora_engine's kernels,
keeping PEFT's and bitsandbytes' modules, parameters and state dict.

``patch_peft_model(model)`` swaps the ``__class__`` of every live LoRA layer over a bitsandbytes 4-bit base
(``peft.tuners.lora.bnb.Linear4bit``) or a plain ``nn.Linear`` base (``peft.tuners.lora.layer.Linear``), and of
every IA3 layer over the same bases (``peft.tuners.ia3.bnb.Linear4bit``, ``peft.tuners.ia3.layer.Linear``), to a
subclass that overrides ``forward`` only. Nothing else changes: the module objects, parameter names and
state-dict keys are PEFT's, so ``save_pretrained``, ``load_adapter``, ``set_adapter``, ``disable_adapter()``
and ``merge_and_unload()`` run PEFT's code as before. The subclasses keep "Linear" in their names because
PEFT's ``target_modules="all-linear"`` matches adapter layers by class name, and they give PEFT's own names
(``lora.Linear``, ``lora.Linear4bit``) to the module repr and to ``get_layer_status`` (which reads the repr).

The fused forward covers one active vanilla LoRA adapter (any scaling, rsLoRA included; dropout on the LoRA branch
drawn in-kernel; base bias frozen or not; ``lora_bias``, its term joining the bias), one active DoRA adapter over
either base (magnitude, A and B trained through the kernels, the weight norm detached as PEFT does; with dropout in
training PEFT's rule, the DoRA term of the dropped input beside the base product of x, the mask drawn in-kernel),
several active LoRA adapters (PEFT adds up their terms: one call over their stacked factors; where one draws dropout
in training, each adapter's left factor drawn by its own dropout module and lora_A, as PEFT draws them, then one
call over those side by side), or one active IA3 adapter (the input scale of feed-forward layers fused into the
GEMM's prologue, the output scale of the others into its epilogue, with PEFT's dtypes: its 4-bit IA3 layer returns
float32 for a 16-bit input outside autocast). PEFT's mixed batches (``adapter_names``, one name per sample,
"__base__" for none) over a 4-bit base run ``multi_lora_linear_4bit`` (the base product once, each row's low-rank
term from its own adapter) when every named adapter of the layer is a plain LoRA adapter without ``lora_bias``
(gradients included). Merging stays PEFT's. Anything else runs PEFT's forward for that call: other LoRA variants,
the mixed batches the kernels do not serve, several active adapters with DoRA among them, merged or disabled
adapters, layouts or devices the kernels do not read, and a LoRA layer stacked on another tuner layer (a
``PeftMixedModel`` with LoHa, LoKr, AdaLoRA... under LoRA), whose delta only PEFT's forward adds. The
``PatchReport`` lists those layers and why; each reason is logged once.

Under FSDP2 the fused 4-bit layers read the gathered packed bytes with the quant state bitsandbytes also keeps on
the module (the gathered weight is a plain tensor without it). Packed bytes that arrive in another dtype than
their storage (FSDP's ``MixedPrecisionPolicy(param_dtype=...)`` casts them value by value) raise, naming the fix.
LoRA modules FSDP2 shards on their own (PEFT's ``fsdp_auto_wrap_policy``, which HF Trainer applies) are gathered by
FSDP only around a forward of theirs: each factor (and DoRA's magnitude) is copied whole by a method registered as a
forward of its module (FSDP2's ``register_fsdp_forward_method``), which FSDP gathers around the call and whose
gradient it reduce-scatters; everything above then runs as over unsharded modules, grouped projections and mixed
batches included. The same policy shards each IA3 layer's ``ia3_l`` ParameterDict on its own, and nothing calls a
forward of it (PEFT's own forward fails on the shard): the fused IA3 forward reads each vector whole the same way.
FSDP1 wrappers gather a module only inside its own forward: for plain LoRA the left factor is
``lora_A(drop(x))`` through that forward and B comes from ``lora_B`` on the identity (``[I; 0]`` with ``lora_bias``),
then one ``lowrank_linear_4bit`` call adds the base product; DoRA and mixed batches run PEFT's forward there.

The bitsandbytes 4-bit layers without a fused adapter get the same treatment: ``FusedLinear4bit``, a
``bnb.nn.Linear4bit`` subclass overriding ``forward`` only (named ``Linear4bit`` in the repr), runs
``lora_engine.linear_4bit`` (``x·deq(W)ᵀ + bias``, the dispatcher's base-only paths) with bitsandbytes' dtype rules.
That covers the projections no adapter targets, the frozen layers of a prompt-learning model (Prefix Tuning,
P-tuning, prompt tuning) and a model without PEFT (``patch_model``); also the bases of the LoRA and IA3 layers,
which PEFT's forward calls when such a layer falls back (the fused forward reads their weight directly). A call
the 4-bit path cannot read (a weight not quantized yet or repacked for bitsandbytes' CPU kernel, a sharded weight
outside FSDP's gather, bf16 in the interpreter) runs bitsandbytes' forward, reported once.
``patch_model`` and ``patch_peft_model`` are one implementation; ``unpatch_model`` / ``unpatch_peft_model``
restore every class. With ``group_projections=True`` they also group the q/k/v and gate/up projections of
transformers' Llama, Mistral and Qwen2 blocks (``integrations/grouped.py``; opt-in, not yet measured on a GPU).

``register_fused_layers(config)`` is the other route: PEFT builds the fused classes directly in
``get_peft_model`` (through ``LoraConfig._register_custom_module``, an experimental PEFT API).
"""

from __future__ import annotations

import contextvars
import dataclasses
import sys
import threading
import types
from typing import Any, Callable, Optional, Union

import torch
from peft.tuners.ia3.layer import IA3Layer
from peft.tuners.ia3.layer import Linear as PeftIA3Linear
from peft.tuners.lora.layer import Linear as PeftLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .. import dispatch
from .. import functional as F
from ..dispatch import as_dtype
from ..format import is_cpu_packed
from ..validation import ACTIVATION_DTYPES

try:  # PEFT defines its 4-bit layer only when bitsandbytes can run 4-bit on this machine
    import bitsandbytes as bnb
    from peft.tuners.ia3.bnb import Linear4bit as PeftIA3Linear4bit
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
except ImportError:  # pragma: no cover - bitsandbytes is a dependency; kept for partial installs
    bnb = None
    PeftLinear4bit = PeftIA3Linear4bit = None

try:
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
except ImportError:  # pragma: no cover - a torch built without torch.distributed
    FSDPModule, register_fsdp_forward_method = (), None  # isinstance(m, ()) is False

_BNB_4BIT_LAYERS = tuple(kind for kind in (PeftLinear4bit, PeftIA3Linear4bit) if kind is not None)
# What the fused forward serves in one call: an adapter's name, or the names of several active LoRA adapters
Adapters = Union[str, tuple[str, ...]]

__all__ = [
    "FusedLinear4bit",
    "PatchReport",
    "patch_model",
    "patch_peft_model",
    "register_fused_layers",
    "unpatch_model",
    "unpatch_peft_model",
]

_PATCH_ATTR = "_lora_engine_patch"  # (report, layer name) on each patched layer, for fallbacks seen at run time

# Outputs a grouped attention or MLP forward computed for its projections (integrations/grouped.py): layer ->
# (the input tensor they were computed for, the output), set for the duration of that module's original forward.
# A context variable: threads and asyncio tasks running the same model each see only their own.
PRECOMPUTED: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("lora_engine_precomputed", default=None)


def _precomputed(layer: nn.Module, x: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The output a grouped forward computed for ``layer`` on exactly this input object, or None."""
    if torch.compiler.is_compiling():  # grouping never runs under compile, and the lookup would break the graph
        return None
    table = PRECOMPUTED.get()
    if table is None or args or kwargs:
        return None
    entry = table.get(layer)
    return entry[1] if entry is not None and entry[0] is x else None


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch_peft_model` / :func:`patch_model` did.

    patched: names of the LoRA and IA3 layers given a fused class (its forward runs the kernels when it can).
    fallbacks: patched LoRA / IA3 layers that run PEFT's own forward, with the reasons: those known when patching, and
        those met on later calls (outside ``torch.compile``).
    skipped: LoRA / IA3 layers left as PEFT made them (types or base layers the kernels do not cover), with why.
    base_patched: the other bitsandbytes 4-bit layers (no adapter, or one of a skipped type, a prompt-learning
        model's frozen layers), given a class whose forward runs ``lora_engine.linear_4bit``.
    lora_bases: the 4-bit base layers of the patched LoRA / IA3 layers, given the same class. The fused forward
        reads their weight directly; PEFT's forward (a fallback) calls them and so runs the same 4-bit path.
    base_fallbacks: 4-bit layers (of either list) that run bitsandbytes' own forward, with the reasons.
    base_skipped: 4-bit layers left as they are, with why.
    grouped: with ``group_projections=True``, the attention and MLP modules whose projections (q/k/v, gate/up)
        are computed together, each with the names of its member layers.
    group_skipped: with ``group_projections=True``, attention and MLP modules left to per-layer calls, with why.
    group_fallbacks: grouped modules that ran per-layer calls (for some or all calls), with the reasons (outside
        ``torch.compile``, under which every group runs per layer).
    """

    patched: list[str] = dataclasses.field(default_factory=list)
    fallbacks: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    kinds: set[str] = dataclasses.field(default_factory=set)  # "LoRA", "IA3": the adapter kinds met
    base_patched: list[str] = dataclasses.field(default_factory=list)
    lora_bases: list[str] = dataclasses.field(default_factory=list)
    base_fallbacks: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    base_skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    grouped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    group_skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    group_fallbacks: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    grouping_requested: bool = False

    @property
    def num_patched(self) -> int:
        """LoRA layers given a fused class, those that fall back to PEFT's forward included."""
        return len(self.patched)

    @property
    def num_fused(self) -> int:
        """Patched LoRA layers with no fallback recorded: the ones that run the fused kernels."""
        return sum(name not in self.fallbacks for name in self.patched)

    @property
    def num_base_fused(self) -> int:
        """Layers of ``base_patched`` with no fallback recorded: the ones that run lora_engine's 4-bit path."""
        return sum(name not in self.base_fallbacks for name in self.base_patched)

    def add_fallback(self, name: str, reason: str) -> None:
        reasons = self.fallbacks.setdefault(name, [])
        if reason not in reasons:
            reasons.append(reason)

    def add_base_fallback(self, name: str, reason: str) -> None:
        reasons = self.base_fallbacks.setdefault(name, [])
        if reason not in reasons:
            reasons.append(reason)

    def add_group_fallback(self, name: str, reason: str) -> None:
        reasons = self.group_fallbacks.setdefault(name, [])
        if reason not in reasons:
            reasons.append(reason)

    def summary(self) -> str:
        """A few readable lines: counts, then each fallback and skipped layer with its reason."""
        torch_backend = dispatch.get_backend() == "torch"
        clauses = []
        total = len(self.patched) + len(self.skipped)
        if total or not (self.base_patched or self.base_skipped):
            route = "the torch reference (backend 'torch')" if torch_backend else "the fused kernels"
            kinds = "/".join(sorted(self.kinds, key=["LoRA", "IA3"].index)) or "LoRA"
            clauses.append(f"{self.num_fused}/{total} PEFT {kinds} layers run {route}")
            if self.fallbacks:
                verb = "falls" if len(self.fallbacks) == 1 else "fall"
                clauses.append(f"{len(self.fallbacks)} {verb} back to PEFT's forward")
            if self.skipped:
                clauses.append(f"{len(self.skipped)} not patched")
        base_total = len(self.base_patched) + len(self.base_skipped)
        if base_total:
            kind = "other 4-bit layers" if total else "4-bit layers"
            clauses.append(f"{self.num_base_fused}/{base_total} {kind} run {_base_route(torch_backend)}")
            falling = sum(name in self.base_fallbacks for name in self.base_patched)
            if falling:
                clauses.append(f"{falling} {'falls' if falling == 1 else 'fall'} back to bitsandbytes' forward")
            if self.base_skipped:
                clauses.append(f"{len(self.base_skipped)} not patched")
        if self.grouping_requested:
            clauses.append(_group_clause(self))
        lines = ["lora_engine: " + "; ".join(clauses)]
        if self.fallbacks:
            lines.append("  falling back to PEFT's forward (for some or all calls):")
            lines += [f"    {name}: {'; '.join(reasons)}" for name, reasons in self.fallbacks.items()]
        if self.skipped:
            lines.append("  not patched:")
            lines += [f"    {name}: {reason}" for name, reason in self.skipped.items()]
        if self.base_fallbacks:
            lines.append("  4-bit layers falling back to bitsandbytes' forward (for some or all calls):")
            lines += [f"    {name}: {'; '.join(reasons)}" for name, reasons in self.base_fallbacks.items()]
        if self.base_skipped:
            lines.append("  4-bit layers not patched:")
            lines += [f"    {name}: {reason}" for name, reason in self.base_skipped.items()]
        if self.group_fallbacks:
            lines.append("  projection groups running per-layer calls (for some or all calls):")
            lines += [f"    {name}: {'; '.join(reasons)}" for name, reasons in self.group_fallbacks.items()]
        if self.group_skipped:
            lines.append("  projections not grouped:")
            lines += [f"    {name}: {reason}" for name, reason in self.group_skipped.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _group_clause(report: PatchReport) -> str:
    """E.g. "4 projection groups fused (q/k/v, gate/up)", with the groups that fall back or were not grouped."""
    kinds = []
    for members in report.grouped.values():
        kind = "/".join(name.rsplit(".", 1)[-1].removesuffix("_proj") for name in members)
        if kind not in kinds:
            kinds.append(kind)
    clause = f"{len(report.grouped)} projection groups fused" + (f" ({', '.join(kinds)})" if kinds else "")
    if report.group_fallbacks:
        falling = len(report.group_fallbacks)
        clause += f", {falling} {'falls' if falling == 1 else 'fall'} back to per-layer calls"
    if report.group_skipped:
        clause += f", {len(report.group_skipped)} not grouped"
    return clause


def _base_route(torch_backend: bool) -> str:
    """What the 4-bit layers without a fused adapter run, with the dispatcher's rule read from its table."""
    if torch_backend:
        return "the torch reference (backend 'torch')"
    route = "lora_engine's 4-bit path"
    limit = dispatch.bitsandbytes_token_limit()
    if limit is not None:
        below = f"below {limit} tokens" if limit < sys.maxsize else "at every token count"
        route += f" ({below} on CUDA that path keeps bitsandbytes' kernels, measured faster)"
    return route


_MISSING = object()


def _own_attr(module: nn.Module, name: str) -> Any:
    """``name`` from the instance's own dict or its parameters, buffers and submodules; ``_MISSING`` if none holds
    it. nn.Module's ``__getattr__``, which serves the last three, runs only after Python's own lookup has failed,
    and that costs microseconds each time (a layer's forward reads a dozen such attributes)."""
    state = module.__dict__
    if name in state:
        return state[name]
    for table in ("_parameters", "_buffers", "_modules"):
        if name in state[table]:
            return state[table][name]
    return _MISSING


def _attr(module: nn.Module, name: str, *default: Any) -> Any:
    """``getattr(module, name, *default)``, looked up in the module's own tables first (``_own_attr``)."""
    value = _own_attr(module, name)
    return getattr(module, name, *default) if value is _MISSING else value


def _base_layer(layer: BaseTunerLayer) -> nn.Module:
    """``layer.get_base_layer()``. PEFT walks the ``base_layer`` chain with ``hasattr``, and the last step, a miss
    through nn.Module's ``__getattr__``, costs microseconds: a direct base that holds no ``base_layer`` of its own
    (no tuner layer stacked in between) ends the walk here."""
    direct = _attr(layer, "base_layer")
    if (isinstance(direct, BaseTunerLayer) or hasattr(type(direct), "base_layer")
            or _own_attr(direct, "base_layer") is not _MISSING):  # fmt: skip
        return layer.get_base_layer()
    return direct


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _active_adapter(layer: nn.Module) -> tuple[Optional[Adapters], Optional[str]]:
    """(the active adapter of this layer, or the tuple of its active LoRA adapters where several are, None) or
    (None, why the fused forward cannot serve the layer)."""
    if isinstance(layer, IA3Layer):
        return _active_ia3_adapter(layer)
    if layer.disable_adapters:
        return None, "adapters disabled"
    if layer.merged:
        return None, "adapter merged into the base weight"
    lora_A = _attr(layer, "lora_A")
    active = [name for name in layer.active_adapters if name in lora_A]
    if not active:
        return None, "no active adapter in this layer"
    if len(active) > 1:
        return _several_adapters(layer, active)
    name = active[0]
    if name in layer.lora_variant:
        if not getattr(layer, "use_dora", {}).get(name, False):
            return None, f"LoRA variant {type(layer.lora_variant[name]).__name__}"
    reason = _factors_reason(layer, name)
    return (None, reason) if reason is not None else (name, None)


def _several_adapters(layer: LoraLayer, names: list[str]) -> tuple[Optional[Adapters], Optional[str]]:
    """Several active LoRA adapters, whose terms PEFT adds up, each plain LoRA with factors of one dtype: one fused
    call over their stacked factors (``_FusedForward._lora_args``), or, where one draws dropout in training, over
    their left factors made by their own modules (``_FusedForward._factors_through_modules``)."""
    dtypes = set()
    for name in names:
        if name in layer.lora_variant:
            variant = type(layer.lora_variant[name]).__name__
            return None, f"several active adapters with LoRA variant {variant} ({name!r})"
        reason = _factors_reason(layer, name)
        if reason is not None:
            return None, f"several active adapters: {reason} ({name!r})"
        dtypes.update((layer.lora_A[name].weight.dtype, layer.lora_B[name].weight.dtype))
    if len(dtypes) > 1:
        return None, f"several active adapters with factors in {sorted(str(dtype) for dtype in dtypes)}"
    return tuple(names), None


def _not_plain_lora(layer: LoraLayer, name: str) -> Optional[str]:
    """Why adapter ``name`` is not plain LoRA the kernels can combine with others in this call (a LoRA variant,
    factors they do not read, dropout drawn in training), phrased to follow "...adapters" directly; None when it
    is."""
    if name in layer.lora_variant:
        return f" with LoRA variant {type(layer.lora_variant[name]).__name__}"
    reason = _factors_reason(layer, name)
    if reason is not None:
        return f": {reason}"
    if _draws_dropout(layer, name):
        return " with lora_dropout in training"
    return None


def _factors_reason(layer: LoraLayer, name: str) -> Optional[str]:
    """Why adapter ``name``'s factors are not what the kernels read as A and B (None when they are): ``nn.Linear``
    modules, plain, sharded on their own by FSDP2 (read whole inside its gather: ``_whole_parameters``) or wrapped by
    FSDP1 (read through their forwards: ``_FusedForward._factors_through_modules``; not for DoRA, whose norm needs
    them whole). A bias of lora_B (PEFT's ``lora_bias``) is read too: it joins the layer's bias."""
    lora_A, lora_B = _attr(layer, "lora_A")[name], _attr(layer, "lora_B")[name]
    if name in layer.lora_variant and _fsdp1_wrapped(lora_A, lora_B, _attr(layer, "lora_magnitude_vector")[name]):
        return f"DoRA: {_FSDP1_LORA_MODULES}"
    lora_bias = bool(layer.lora_bias.get(name, False))
    if not (_linear(lora_A) and _linear(lora_B) and _attr(lora_A, "bias", None) is None
            and (_attr(lora_B, "bias", None) is not None) == lora_bias):  # fmt: skip
        return "LoRA factors are not nn.Linear modules with the biases PEFT gives them"
    if _has_hooks(lora_A) or _has_hooks(lora_B):
        return "the LoRA modules have forward hooks (e.g. accelerate offloading)"
    dropout = _attr(layer, "lora_dropout")[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"dropout module {type(dropout).__name__}"
    if not _is_number(layer.scaling[name]):
        return "scaling is not a Python number"
    return None


_FSDP1_LORA_MODULES = (
    "FSDP1 wraps the LoRA modules on their own (PEFT's fsdp_auto_wrap_policy under FSDP1, accelerate's default "
    "version): only their own forwards gather them, and this needs the factors whole. Use FSDP2 (fully_shard; "
    "fsdp_version 2 in HF Trainer / accelerate), or wrap whole decoder layers, for the fused forward here"
)


def _linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, one FSDP2 shards on its own (``fully_shard`` subclasses its class), or one FSDP1 wraps."""
    if type(module) is nn.Linear or (isinstance(module, FSDPModule) and isinstance(module, nn.Linear)):
        return True
    return _fsdp1(module) and type(getattr(module, "module", None)) is nn.Linear


def _fsdp1_wrapped(*modules: nn.Module) -> bool:
    """One of ``modules`` is an FSDP1 wrapper (the plain ``nn.Linear`` of the unsharded case is ruled out first)."""
    return any(type(module) is not nn.Linear and _fsdp1(module) for module in modules)


def _draws_dropout(layer: LoraLayer, name: str) -> bool:
    dropout = _attr(layer, "lora_dropout")[name]
    return dropout.training and isinstance(dropout, nn.Dropout) and dropout.p > 0


def _linear_through_forward(module: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W, b) of a linear module that only its own forward gathers (an FSDP1 wrapper), read through that forward,
    which also hooks their gradients' reduce-scatter: one call on the identity and a zero row in ``like``'s dtype and
    device, ``[I; 0]·Wᵀ + b = [Wᵀ + b; b]`` (PEFT's DoRA reads lora_B through ``lora_B(I)`` under FSDP as well).
    With a bias, W is recovered as ``(Wᵀ + b) - b``: exact up to one rounding of the sum in the dtype the forward
    computes in (the factor's, the autocast dtype under autocast, which rounds PEFT's own ``lora_B(left) + b``
    likewise)."""
    r = module.in_features
    if getattr(module, "bias", None) is None:
        return module(torch.eye(r, dtype=like.dtype, device=like.device)).t(), None
    out = module(torch.eye(r + 1, r, dtype=like.dtype, device=like.device))  # its last row is zero
    return (out[:r] - out[r]).t(), out[r]


def _plus_scaled(bias: Optional[torch.Tensor], scaling: float, lora_bias: torch.Tensor) -> torch.Tensor:
    """``bias + scaling·lora_bias`` (no bias: the term alone): PEFT's ``lora_bias`` adds s·b once, after the dropout."""
    term = scaling * lora_bias
    return term if bias is None else bias + term


def _sharded_by_fsdp(module: nn.Module) -> bool:
    """``module`` is sharded on its own: FSDP2's ``fully_shard`` made it an ``FSDPModule``, or FSDP1 wrapped it."""
    return any(kind.__name__ in ("FSDPModule", "FullyShardedDataParallel") for kind in type(module).__mro__)


def _fsdp1(module: nn.Module) -> bool:
    """``module`` is wrapped by FSDP1, which gathers it only inside its own forward."""
    return not isinstance(module, FSDPModule) and _sharded_by_fsdp(module)


# The method FSDP2 runs as a forward of a module it shards on its own, so that it gathers the module's parameters
# around the call (``_whole``); published under the first name once registered under the second.
_WHOLE, _WHOLE_UNPUBLISHED = "_lora_engine_whole_parameters", "_lora_engine_whole_parameters_registering"
_REGISTERING = threading.Lock()


def _copy_of_parameters(module: nn.Module, names: tuple[str, ...]) -> tuple[Optional[torch.Tensor], ...]:
    # copies: FSDP frees the gathered parameters after the call (reshard_after_forward), the copies stay
    return tuple(None if (param := getattr(module, name, None)) is None else param.clone() for name in names)


def _whole_parameters(module: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(module.weight, module.bias)`` whole (bias None where it has none), with their gradients reaching the
    parameters; for a module FSDP2 shards on its own, copies (``_whole``)."""
    if type(module) is nn.Linear:  # the common case first: one call per factor per forward
        return _attr(module, "weight"), _attr(module, "bias")
    if not isinstance(module, FSDPModule):
        if _sharded_by_fsdp(module):  # FSDP1 wrappers take _factors_through_modules or PEFT's forward
            raise RuntimeError(f"{type(module).__name__}: only FSDP2 gathers a module's weight outside its forward")
        return module.weight, getattr(module, "bias", None)
    return _whole(module, ("weight", "bias"))


def _ia3_vector(layer: IA3Layer, adapter: str) -> torch.Tensor:
    """Adapter ``adapter``'s IA3 vector whole: PEFT's ``fsdp_auto_wrap_policy`` makes FSDP2 shard the layer's
    ``ia3_l`` ParameterDict on its own, and nothing calls a forward of it (PEFT's own forward then fails on the
    shard): read through ``_whole``."""
    vectors = _attr(layer, "ia3_l")
    return _whole(vectors, (adapter,))[0] if isinstance(vectors, FSDPModule) else vectors[adapter]


def _whole(module: nn.Module, names: tuple[str, ...]) -> tuple[Optional[torch.Tensor], ...]:
    """The parameters ``names`` of a module FSDP2 shards on its own (None for a name that is None), copied whole by a
    method registered as a forward of the module (``register_fsdp_forward_method``): FSDP gathers the parameters
    around the call, casts them as its ``MixedPrecisionPolicy`` says, gathers them again for the copies' backward and
    reduce-scatters their gradients into the shards', as for the module's own forward (one all-gather per call, as
    the module's forward costs). The method is registered on the first read, under a lock, and published only once
    FSDP wraps it."""
    state = vars(module)
    read = state.get(_WHOLE)
    if read is None:
        with _REGISTERING:
            read = state.get(_WHOLE)
            if read is None:
                state[_WHOLE_UNPUBLISHED] = types.MethodType(_copy_of_parameters, module)
                register_fsdp_forward_method(module, _WHOLE_UNPUBLISHED)
                read = state[_WHOLE] = state.pop(_WHOLE_UNPUBLISHED)
    return read(names)


def _whole_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` whole: for a module FSDP2 shards on its own, a copy (``_whole``); FSDP1 wrappers never
    come here."""
    return _whole(module, ("weight",))[0] if isinstance(module, FSDPModule) else _attr(module, "weight")


def _mixed_batch_reason(layer: LoraLayer, x: Any, names: Any) -> Optional[str]:
    """Why a call with PEFT's ``adapter_names`` (one name per sample, "__base__": none) cannot run the mixed-batch
    kernels (None when it can): every named adapter of this layer must be a plain LoRA adapter without dropout."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged into the base weight"
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES:
        return f"input of type {type(x).__name__} and dtype {getattr(x, 'dtype', None)}"
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        return f"adapter_names of type {type(names).__name__} (PEFT passes a list of str)"
    if x.dim() < 2 or len(names) != x.shape[0]:
        return f"{len(names)} adapter_names for an input of shape {tuple(x.shape)}"
    used = [name for name in dict.fromkeys(names) if name in layer.lora_A]  # PEFT skips names this layer lacks
    for name in used:
        if _fsdp1_wrapped(layer.lora_A[name], layer.lora_B[name]):
            return f"mixed-batch adapter_names: {_FSDP1_LORA_MODULES} ({name!r})"
        if layer.lora_bias.get(name, False):
            return f"mixed-batch adapter_names: lora_bias ({name!r})"
        reason = _not_plain_lora(layer, name)
        if reason is not None:
            return f"mixed-batch adapter_names{reason} ({name!r})"
    return None


def _active_ia3_adapter(layer: IA3Layer) -> tuple[Optional[str], Optional[str]]:
    if layer.disable_adapters:
        return None, "adapters disabled"
    if layer.merged:
        return None, "adapter merged into the base weight"
    vectors = _attr(layer, "ia3_l")
    if _fsdp1_wrapped(vectors):
        return None, _FSDP1_IA3_VECTORS
    active = [name for name in layer.active_adapters if name in vectors]
    if not active:
        return None, "no active adapter in this layer"
    if len(active) > 1:
        return None, "several active adapters"
    scale = vectors[active[0]]
    features = layer.in_features if layer.is_feedforward else layer.out_features
    if scale.numel() != features:
        return None, f"IA3 vector of shape {tuple(scale.shape)} for {features} features"
    return active[0], None


_FSDP1_IA3_VECTORS = (
    "FSDP1 wraps the IA3 vectors on their own (PEFT's fsdp_auto_wrap_policy under FSDP1), and nothing gathers them: "
    "PEFT's forward cannot read them either. Use FSDP2 (fsdp_version 2), or wrap whole decoder layers"
)


def _has_hooks(module: nn.Module) -> bool:
    """Hooks (accelerate's offloading ones included) would run in ``module(x)``, which the fused forward skips;
    FSDP2's own, of a module it shards on its own, run around the read of its parameters (``_whole_parameters``).

    accelerate sets ``_hf_hook`` as a plain attribute, which lives in the instance's ``__dict__``: looked up there,
    since ``hasattr`` on a module without it goes through ``nn.Module.__getattr__``, which raises (µs per call)."""
    if "_hf_hook" in vars(module):
        return True
    if not (module._forward_hooks or module._forward_pre_hooks):
        return False
    hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    return not isinstance(module, FSDPModule) or any(not _fsdp2_hook(hook) for hook in hooks)


def _fsdp2_hook(hook: Callable) -> bool:
    return type(getattr(hook, "__self__", None)).__name__ == "FSDPState"


def _stack_reason(layer: BaseTunerLayer, base: nn.Module) -> Optional[str]:
    """Why the base layer's output is not just the innermost base weight's product (None when it is); ``base`` is
    ``layer.get_base_layer()``.

    ``get_base_layer()`` skips every layer in between, but PEFT's forward calls ``self.base_layer(x)``: another
    tuner layer there (a ``PeftMixedModel`` stacking LoRA on LoHa, LoKr, AdaLoRA...) adds its own delta.
    """
    direct = _attr(layer, "base_layer")
    if direct is base:
        return None
    kind = f"{type(direct).__module__}.{type(direct).__qualname__}"
    if isinstance(direct, BaseTunerLayer):
        return f"stacked on another PEFT tuner layer ({kind}), whose delta only PEFT's forward adds"
    return f"a {kind} module sits between the LoRA layer and its base {type(base).__name__}"


def _is_sharded(weight: torch.Tensor) -> bool:
    """A DTensor: FSDP2 holds each rank's shard so between forwards, and gathers the whole tensor for them."""
    if type(weight).__name__ == "DTensor":
        return True
    # a DTensor has no __torch_function__ of its own; bitsandbytes' Params4bit has one, which makes .data cost µs
    with torch._C.DisableTorchFunctionSubclass():
        data = getattr(weight, "data", None)
    return type(data).__name__ == "DTensor"


def _quant_state(base: nn.Module) -> Any:
    """The 4-bit base weight's quant state: on the weight, or on the module, where bitsandbytes keeps it too. FSDP
    hands the forward the gathered packed bytes as a plain tensor, without it."""
    state = getattr(_attr(base, "weight"), "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def _check_packed_dtype(base: nn.Module) -> None:
    """Refuse packed bytes that arrive in another dtype than they are stored in: something (FSDP's
    MixedPrecisionPolicy casting every parameter to its param_dtype) converted the codes value by value."""
    weight = _attr(base, "weight")
    stored = getattr(weight, "quant_storage", None) if hasattr(weight, "quant_state") else None
    stored = stored if stored is not None else getattr(base, "quant_storage", None)
    if stored is None:
        return
    with torch._C.DisableTorchFunctionSubclass():  # Params4bit's __torch_function__ makes .dtype cost µs
        dtype = weight.dtype
    if dtype != stored:
        raise ValueError(
            f"the 4-bit base weight is stored as {stored} but arrives as {dtype}: its packed codes were cast "
            "value by value (FSDP's MixedPrecisionPolicy(param_dtype=...) does this). Store it in the dtype the "
            f"parameters are cast to (BitsAndBytesConfig(bnb_4bit_quant_storage={dtype})), or leave "
            "param_dtype unset for the modules holding 4-bit layers"
        )


def _base_reason(layer: BaseTunerLayer, sharded_ok: bool = False, base: Optional[nn.Module] = None) -> Optional[str]:
    """Why the kernels cannot read this layer's base weight right now (None when they can). ``sharded_ok``: a
    sharded weight is no reason (when patching: FSDP gathers it before each forward). ``base``: the layer's
    ``get_base_layer()`` where the caller has it."""
    base = layer.get_base_layer() if base is None else base
    stacked = _stack_reason(layer, base)
    if stacked is not None:
        return stacked
    if _has_hooks(base):
        return "the base layer has forward hooks (e.g. accelerate offloading)"
    weight = _attr(base, "weight")
    if _is_sharded(weight):
        return (
            None if sharded_ok else "the base weight is sharded (FSDP gathers it in the forward of the module it wraps)"
        )
    if isinstance(layer, _BNB_4BIT_LAYERS):
        state = _quant_state(base)
        if state is None:
            return "the base weight is not quantized yet"
        if is_cpu_packed(state):
            return "bitsandbytes repacked the base weight for its CPU kernel"
        return None
    if weight.dtype not in ACTIVATION_DTYPES or type(weight) not in (nn.Parameter, torch.Tensor):
        return f"base weight of type {type(weight).__name__} and dtype {weight.dtype}"
    if weight.requires_grad:
        return "the base weight is trainable"
    return None


def _device_reason(device: torch.device) -> Optional[str]:
    if dispatch.get_backend() == "auto" and not dispatch.use_triton(device):
        return f"Triton cannot run on {device.type} tensors (on CPU it needs TRITON_INTERPRET=1)"
    return None  # an explicit backend is honoured: "torch" runs the reference, "triton" raises if it cannot run


def _layer_reason(layer: BaseTunerLayer) -> Optional[str]:
    """Why the layer, as it is now, would run PEFT's forward (independent of the input)."""
    _, reason = _active_adapter(layer)
    return reason or _base_reason(layer, sharded_ok=True) or _device_reason(layer.get_base_layer().weight.device)


class _FusedForward:
    """The forward shared by both fused classes; everything else is PEFT's."""

    def _get_name(self) -> str:
        # nn.Module's repr names the module by this, and PEFT's get_layer_status reads the type from the repr
        # ("lora.Linear"): keep PEFT's class name there.
        return next(kind for kind in type(self).__mro__ if kind in _FUSED).__name__

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        grouped = _precomputed(self, x, args, kwargs)
        if grouped is not None:  # computed with the other projections of this attention or MLP block
            return grouped
        base = _base_layer(self)  # once per call
        self._check_base(base)
        names = kwargs.get("adapter_names")
        if names is not None:
            compute, reason = self._mixed_plan(x, args, kwargs, base)
            if reason is None:
                return self._mixed_forward(x, names, compute, base)
        else:
            adapter, compute, reason = self._fused_plan(x, args, kwargs, base)
            if reason is None:
                return self._fused_forward(x, adapter, compute, base)
        _note_fallback(self, reason)
        return super().forward(x, *args, **kwargs)

    def _mixed_plan(
        self, x: torch.Tensor, args: tuple, kwargs: dict, base: nn.Module
    ) -> tuple[Optional[torch.dtype], Optional[str]]:
        """(compute dtype, None) for the mixed-batch kernels on a call with ``adapter_names``, or (None, why not).
        ``base``: ``self.get_base_layer()``."""
        extra = sorted(key for key, value in kwargs.items() if value is not None and key != "adapter_names")
        if args or extra:
            return None, f"extra forward arguments {extra or len(args)}"
        if not self._serves_mixed_batches:
            return None, "mixed-batch adapter_names (the kernels serve them over a 4-bit base)"
        names = kwargs["adapter_names"]
        reason = _mixed_batch_reason(self, x, names) or _base_reason(self, base=base) or _device_reason(x.device)
        if reason is not None:
            return None, reason
        compute, reason = self._compute_dtype(x, base)
        if reason is None and x.device.type == "cpu" and dispatch.get_backend() != "torch":
            used = [name for name in dict.fromkeys(names) if name in self.lora_A]
            if torch.bfloat16 in (compute, *(dtype for name in used for dtype in self._adapter_dtypes(name))):
                reason = "bf16 in the Triton interpreter (it computes bf16 on raw bits)"
        return (compute, None) if reason is None else (None, reason)

    _serves_mixed_batches = False  # the classes with a _mixed_forward set it

    def _mixed_forward(self, x: torch.Tensor, names: list[str], compute: torch.dtype, base: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def _fused_plan(
        self, x: torch.Tensor, args: tuple, kwargs: dict, base: nn.Module
    ) -> tuple[Optional[Adapters], Optional[torch.dtype], Optional[str]]:
        """(adapter, compute dtype, None) for the fused forward, or (None, None, why PEFT's forward runs).
        ``base``: ``self.get_base_layer()``."""
        if args or kwargs:
            extra = sorted(key for key, value in kwargs.items() if value is not None)
            if args or extra:
                return None, None, f"extra forward arguments {extra or len(args)}"
        adapter, reason = _active_adapter(self)
        if reason is None and (not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES):
            reason = f"input of type {type(x).__name__} and dtype {getattr(x, 'dtype', None)}"
        reason = reason or _base_reason(self, base=base) or _device_reason(x.device)
        if reason is not None:
            return None, None, reason
        compute, reason = self._compute_dtype(x, base)
        if reason is None and x.device.type == "cpu" and dispatch.get_backend() != "torch":
            if torch.bfloat16 in (compute, *self._adapter_dtypes(adapter)):
                reason = "bf16 in the Triton interpreter (it computes bf16 on raw bits)"
        return (adapter, compute, None) if reason is None else (None, None, reason)

    def _check_base(self, base: nn.Module) -> None:
        """Raise where neither forward can be right (PEFT's fallback included); ``base``: ``self.get_base_layer()``."""

    def _compute_dtype(self, x: torch.Tensor, base: nn.Module) -> tuple[Optional[torch.dtype], Optional[str]]:
        """(the dtype the base product runs in, None), or (None, why the fused forward cannot run)."""
        raise NotImplementedError

    def _adapter_dtypes(self, adapter: Adapters) -> tuple[torch.dtype, ...]:
        names = adapter if isinstance(adapter, tuple) else (adapter,)
        lora_A, lora_B = _attr(self, "lora_A"), _attr(self, "lora_B")
        return tuple(dtype for name in names for dtype in (_attr(lora_A[name], "weight").dtype,
                                                           _attr(lora_B[name], "weight").dtype))  # fmt: skip

    def _lora_args(
        self, adapter: Adapters, base_bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, float, float, bool, Optional[torch.Tensor]]:
        """lora_A (r, in), lora_B (out, r), scaling, dropout p, whether dropout is on, and the bias the kernels add:
        ``base_bias`` plus s·b for each lora_B with a bias b (PEFT's ``lora_bias``, which adds it after the dropout,
        once, scaled; the sum carries the gradients of all). Factors FSDP2 shards on their own are read whole
        (``_whole_parameters``). Several adapters (a tuple, none drawing dropout) are one adapter of their summed rank
        with scaling 1: Σᵢ sᵢ·(x·Aᵢᵀ)·Bᵢᵀ = (x·[A₁; A₂; ...]ᵀ)·[s₁B₁, s₂B₂, ...]ᵀ; the stacking is differentiable, so
        each factor gets its own gradient."""
        names = adapter if isinstance(adapter, tuple) else (adapter,)
        factors, bias = [], base_bias
        lora_As, lora_Bs = _attr(self, "lora_A"), _attr(self, "lora_B")
        for name in names:
            lora_B, lora_bias = _whole_parameters(lora_Bs[name])
            if lora_bias is not None:  # _factors_reason checked lora_B has a bias where lora_bias says so
                bias = _plus_scaled(bias, self.scaling[name], lora_bias)
            factors.append((_whole_weight(lora_As[name]), lora_B))
        if isinstance(adapter, tuple):
            lora_A = torch.cat([a for a, _ in factors])
            lora_B = torch.cat([self.scaling[name] * b for name, (_, b) in zip(names, factors)], dim=1)
            return lora_A, lora_B, 1.0, 0.0, False, bias
        dropout = _attr(self, "lora_dropout")[adapter]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
        return *factors[0], self.scaling[adapter], p, dropout.training, bias

    def _through_modules(self, adapter: Adapters) -> bool:
        """Whether the left factors come from the LoRA modules' own forwards: for LoRA modules FSDP1 wraps on their
        own (only their forwards gather them), and for several adapters of which one draws dropout in training (a
        mask per adapter, drawn by its dropout module as in PEFT's forward)."""
        names = adapter if isinstance(adapter, tuple) else (adapter,)
        lora_A, lora_B = _attr(self, "lora_A"), _attr(self, "lora_B")
        if any(_fsdp1_wrapped(lora_A[name], lora_B[name]) for name in names):
            return True
        return isinstance(adapter, tuple) and any(_draws_dropout(self, name) for name in adapter)

    def _factors_through_modules(
        self, x: torch.Tensor, adapter: Adapters, base_bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(left, B, bias)`` of ``left·Bᵀ + bias``: ``[lora_Aᵢ(dropᵢ(x))]`` side by side, through the modules' own
        forwards (FSDP gathers one sharded on its own), and ``[sᵢBᵢ]`` likewise (as ``_lora_args`` stacks them), B
        read through ``lora_B``'s forward where FSDP1 wraps it (``_linear_through_forward``). The input is cast as
        PEFT's forward casts it for the LoRA branch. ``bias`` as ``_lora_args`` makes it."""
        lefts, rights, bias = [], [], base_bias
        for name in adapter if isinstance(adapter, tuple) else (adapter,):
            lora_A, scaling = self.lora_A[name], self.scaling[name]
            x_lora = x
            if not torch.is_autocast_enabled() and getattr(self, "cast_input_dtype_enabled", True):
                x_lora = as_dtype(x, lora_A.weight.dtype)
            left = lora_A(self.lora_dropout[name](x_lora))
            lefts.append(left)
            module = self.lora_B[name]
            if _fsdp1_wrapped(module):
                lora_B, lora_bias = _linear_through_forward(module, left)
            else:
                lora_B, lora_bias = _whole_parameters(module)
            if lora_bias is not None:
                bias = _plus_scaled(bias, scaling, lora_bias)
            rights.append(scaling * lora_B)
        # one dtype: _several_adapters checked the factors have one
        return torch.cat(lefts, dim=-1), torch.cat(rights, dim=1), bias

    def _fused_forward(
        self, x: torch.Tensor, adapter: Adapters, compute: torch.dtype, base: nn.Module
    ) -> torch.Tensor:
        raise NotImplementedError


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _bnb_compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' 4-bit forward computes ``x`` in (setting its compute type on the first call, as it
    does). Under autocast the product runs in the autocast dtype, as bitsandbytes' F.linear would."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return _autocast_dtype(x.device) or base.compute_dtype or x.dtype


def _dense_compute_dtype(base: nn.Module, x: torch.Tensor) -> tuple[Optional[torch.dtype], Optional[str]]:
    """nn.Linear's rule: the autocast dtype, else x's, which must be the weight's (nn.Linear raises otherwise)."""
    autocast = _autocast_dtype(x.device)
    weight_dtype = _attr(base, "weight").dtype
    if autocast is None and x.dtype != weight_dtype:
        return None, f"input dtype {x.dtype} differs from the base weight's {weight_dtype}"
    return autocast or x.dtype, None


def _dense_operands(base: nn.Module, compute: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The frozen dense weight and bias in the compute dtype (cast under autocast, as F.linear does)."""
    weight, bias = _attr(base, "weight"), _attr(base, "bias")
    if weight.dtype != compute:
        weight = weight.to(compute)
        bias = bias.to(compute) if bias is not None else None
    return weight, bias


if PeftLinear4bit is not None:

    class FusedLoraLinear4bit(_FusedForward, PeftLinear4bit):
        """PEFT's ``lora.Linear4bit`` with its forward run by ``lora_engine.lora_linear_4bit``."""

        def _check_base(self, base: nn.Module) -> None:
            if not _is_sharded(_attr(base, "weight")):
                _check_packed_dtype(base)

        def _compute_dtype(self, x: torch.Tensor, base: nn.Module) -> tuple[Optional[torch.dtype], Optional[str]]:
            return _bnb_compute_dtype(base, x), None

        def _fused_forward(
            self, x: torch.Tensor, adapter: Adapters, compute: torch.dtype, base: nn.Module
        ) -> torch.Tensor:
            weight, base_bias, state = _attr(base, "weight"), _attr(base, "bias"), _quant_state(base)
            if self._through_modules(adapter):
                left, lora_B, bias = self._factors_through_modules(x, adapter, base_bias)
                y = F.lowrank_linear_4bit(as_dtype(x, compute), weight, state, left, lora_B, 1.0, bias=bias)
                return as_dtype(y, x.dtype)
            lora_A, lora_B, scaling, p, training, bias = self._lora_args(adapter, base_bias)
            if adapter in self.lora_variant:  # DoRA (the only variant _active_adapter lets through)
                magnitude = _whole_weight(self.lora_magnitude_vector[adapter])  # no lora_bias: bias is the base's
                # PEFT's DoRA takes its dropout route when the layer trains and applies the dropout module as it
                # is; with that module in eval mode the route gives what the dropout-free one gives
                y = F.dora_linear_4bit(
                    as_dtype(x, compute), weight, state, lora_A, lora_B, magnitude, scaling, bias=base_bias,
                    dropout_p=p, training=self.training and training,
                )  # fmt: skip
                return as_dtype(y, x.dtype)
            y = F.lora_linear_4bit(
                as_dtype(x, compute), weight, state, lora_A, lora_B, scaling, bias=bias, dropout_p=p,
                training=training,
            )  # fmt: skip
            return as_dtype(y, x.dtype)  # bitsandbytes returns the input's dtype

        _serves_mixed_batches = True

        def _mixed_forward(
            self, x: torch.Tensor, names: list[str], compute: torch.dtype, base: nn.Module
        ) -> torch.Tensor:
            """PEFT's mixed batch (sample b through adapter ``names[b]``; "__base__" or a name this layer lacks: the
            base alone) through ``lora_engine.multi_lora_linear_4bit``, the dtypes as in ``_fused_forward``."""
            used = [name for name in dict.fromkeys(names) if name in self.lora_A]
            position = {name: i for i, name in enumerate(used)}
            # built on the host from the names: range-checked there, copied to x's device without a sync. Under
            # torch.compile they become a constant of the graph, made on x's device (a host tensor there would be
            # copied to the device at every call of the graph)
            device = x.device if torch.compiler.is_compiling() else None
            indices = torch.tensor([position.get(name, -1) for name in names], dtype=torch.int64, device=device)
            y = F.multi_lora_linear_4bit(
                x.to(compute), base.weight, _quant_state(base), [_whole_weight(self.lora_A[name]) for name in used],
                [_whole_weight(self.lora_B[name]) for name in used], [self.scaling[name] for name in used], indices,
                bias=base.bias,
            )  # fmt: skip
            return y.to(x.dtype)

else:  # pragma: no cover
    FusedLoraLinear4bit = None


class FusedLoraLinear(_FusedForward, PeftLinear):
    """PEFT's ``lora.Linear`` over an ``nn.Linear`` with its forward run by ``lora_engine.lora_linear``."""

    def _compute_dtype(self, x: torch.Tensor, base: nn.Module) -> tuple[Optional[torch.dtype], Optional[str]]:
        return _dense_compute_dtype(base, x)

    def _fused_forward(
        self, x: torch.Tensor, adapter: Adapters, compute: torch.dtype, base: nn.Module
    ) -> torch.Tensor:
        weight, bias = _dense_operands(base, compute)
        if self._through_modules(adapter):
            left, lora_B, bias = self._factors_through_modules(x, adapter, bias)
            return F.lowrank_linear(as_dtype(x, compute), weight, left, lora_B, 1.0, bias=bias)
        lora_A, lora_B, scaling, p, training, bias = self._lora_args(adapter, bias)
        if adapter in self.lora_variant:  # DoRA, with the dropout rule of FusedLoraLinear4bit's
            magnitude = _whole_weight(self.lora_magnitude_vector[adapter])  # no lora_bias: bias is the base's
            # under autocast ``weight`` is this call's cast copy: ‖W‖² comes from the parameter, cached once
            parameter = _attr(base, "weight")
            norm_weight = parameter if weight is not parameter else None
            return F.dora_linear(
                as_dtype(x, compute), weight, lora_A, lora_B, magnitude, scaling, bias=bias, dropout_p=p,
                training=self.training and training, norm_weight=norm_weight,
            )  # fmt: skip
        return F.lora_linear(
            as_dtype(x, compute), weight, lora_A, lora_B, scaling, bias=bias, dropout_p=p,
            training=training,
        )  # fmt: skip


class _FusedIA3Forward(_FusedForward):
    """The IA3 side of the fused forward: one vector scaling the input (feed-forward layers) or the output."""

    def _adapter_dtypes(self, adapter: str) -> tuple[torch.dtype, ...]:
        return (self.ia3_l[adapter].dtype,)


if PeftIA3Linear4bit is not None:

    class FusedIA3Linear4bit(_FusedIA3Forward, PeftIA3Linear4bit):
        """PEFT's ``ia3.Linear4bit`` with its forward run by ``lora_engine.ia3_linear_4bit``."""

        def _check_base(self, base: nn.Module) -> None:
            if not _is_sharded(base.weight):
                _check_packed_dtype(base)

        def _peft_dtype(self, x: torch.Tensor, adapter: str) -> torch.dtype:
            """The dtype of PEFT's result: it upcasts a 16-bit input to float32 outside (CUDA) autocast, and the
            scaled input or output takes the type promotion with the IA3 vector (float32 as PEFT creates it)."""
            upcast = not torch.is_autocast_enabled() and x.dtype != torch.float32
            return torch.promote_types(torch.float32 if upcast else x.dtype, self.ia3_l[adapter].dtype)

        def _compute_dtype(self, x: torch.Tensor, base: nn.Module) -> tuple[Optional[torch.dtype], Optional[str]]:
            # bitsandbytes computes PEFT's (upcast, scaled) input in its compute dtype
            adapter = next(name for name in self.active_adapters if name in self.ia3_l)  # the one (checked before)
            return _bnb_compute_dtype(base, x.to(self._peft_dtype(x, adapter))), None

        def _fused_forward(self, x: torch.Tensor, adapter: str, compute: torch.dtype, base: nn.Module) -> torch.Tensor:
            y = F.ia3_linear_4bit(
                x.to(compute), base.weight, _quant_state(base), _ia3_vector(self, adapter).flatten(),
                self.is_feedforward, bias=base.bias,
            )  # fmt: skip
            return y.to(self._peft_dtype(x, adapter))

else:  # pragma: no cover
    FusedIA3Linear4bit = None


class FusedIA3Linear(_FusedIA3Forward, PeftIA3Linear):
    """PEFT's ``ia3.Linear`` over an ``nn.Linear`` with its forward run by ``lora_engine.ia3_linear``."""

    def _compute_dtype(self, x: torch.Tensor, base: nn.Module) -> tuple[Optional[torch.dtype], Optional[str]]:
        return _dense_compute_dtype(base, x)

    def _fused_forward(self, x: torch.Tensor, adapter: str, compute: torch.dtype, base: nn.Module) -> torch.Tensor:
        weight, bias = _dense_operands(base, compute)
        # PEFT's result keeps the base layer's dtype (it casts the scaled input or output back)
        vector = _ia3_vector(self, adapter).flatten()
        return F.ia3_linear(x.to(compute), weight, vector, self.is_feedforward, bias=bias)


def _linear4bit_reason(layer: nn.Module, sharded_ok: bool = False) -> Optional[str]:
    """Why lora_engine's 4-bit path cannot read this bitsandbytes layer's weight now (None when it can); the
    checks of :func:`_base_reason` for a 4-bit base. ``sharded_ok`` as there."""
    if _is_sharded(_attr(layer, "weight")):
        return None if sharded_ok else "the weight is sharded (FSDP gathers it in the forward of the module it wraps)"
    state = _quant_state(layer)
    if state is None:
        return "the weight is not quantized yet"
    if is_cpu_packed(state):
        return "bitsandbytes repacked the weight for its CPU kernel"
    return None


if bnb is not None:

    class FusedLinear4bit(bnb.nn.Linear4bit):
        """bitsandbytes' ``Linear4bit`` with its forward run by ``lora_engine.linear_4bit`` (the dispatcher's
        base-only paths), for 4-bit layers without a fused adapter. Everything else is bitsandbytes'."""

        def _get_name(self) -> str:
            return bnb.nn.Linear4bit.__name__  # the module repr keeps bitsandbytes' name

        def _plan(self, x: torch.Tensor) -> tuple[Optional[torch.dtype], Optional[str]]:
            """(the dtype the product runs in, None), or (None, why this call runs bitsandbytes' forward). Sets
            the layer's compute type on its first call, as bitsandbytes' forward does."""
            if _quant_state(self) is not None and not _is_sharded(_attr(self, "weight")):
                _check_packed_dtype(self)  # neither forward can be right on codes cast value by value
            reason = _linear4bit_reason(self)
            if reason is None and (not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES):
                reason = f"input of type {type(x).__name__} and dtype {getattr(x, 'dtype', None)}"
            reason = reason or _device_reason(x.device)
            if reason is not None:
                return None, reason
            if not self.compute_type_is_set:  # bitsandbytes' forward, step by step, from here on
                self.set_compute_type(x)
                self.compute_type_is_set = True
            # under autocast bitsandbytes' F.linear runs in the autocast dtype
            compute = _autocast_dtype(x.device) or self.compute_dtype or x.dtype
            if x.device.type == "cpu" and compute == torch.bfloat16 and dispatch.get_backend() != "torch":
                return None, "bf16 in the Triton interpreter (it computes bf16 on raw bits)"
            return compute, None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            grouped = _precomputed(self, x)
            if grouped is not None:  # computed with the other projections of this attention or MLP block
                return grouped
            compute, reason = self._plan(x)
            if reason is not None:
                _note_fallback(self, reason)
                return super().forward(x)
            autocast = _autocast_dtype(x.device)
            input_dtype = x.dtype
            if self.compute_dtype is not None:
                x = x.to(self.compute_dtype)
            bias = _attr(self, "bias")
            if bias is not None:
                if bias.dtype != x.dtype:
                    bias.data = bias.data.to(x.dtype)  # bitsandbytes converts the parameter itself
                if self.compute_dtype is not None:
                    bias = bias.to(self.compute_dtype)
            if autocast is not None:
                x = x.to(autocast)
                bias = bias.to(autocast) if bias is not None else None
            return F.linear_4bit(x, _attr(self, "weight"), _quant_state(self), bias).to(input_dtype)

else:  # pragma: no cover
    FusedLinear4bit = None


_FUSED = {PeftLinear: FusedLoraLinear, PeftIA3Linear: FusedIA3Linear}
if PeftLinear4bit is not None:
    _FUSED[PeftLinear4bit] = FusedLoraLinear4bit
    _FUSED[PeftIA3Linear4bit] = FusedIA3Linear4bit
_ORIGINAL = {fused: original for original, fused in _FUSED.items()}


def _note_fallback(layer: nn.Module, reason: str) -> None:
    """Record a fallback in the layer's report and log each new reason once (not while compiling: the logging
    call would break the graph, and the stock forward is correct there anyway)."""
    if torch.compiler.is_compiling():
        return
    is_base = FusedLinear4bit is not None and isinstance(layer, FusedLinear4bit)
    report, name = getattr(layer, _PATCH_ATTR, (None, type(layer).__name__))
    if report is not None:
        known = report.base_fallbacks if is_base else report.fallbacks
        if reason in known.get(name, ()):
            return  # already in the report, and in the warning patching logged
        (report.add_base_fallback if is_base else report.add_fallback)(name, reason)
    if is_base:
        key, message = f"bnb-fallback:{reason}", f"4-bit layer {name} runs bitsandbytes' own forward"
    else:
        key, message = f"peft-fallback:{reason}", f"PEFT layer {name} runs PEFT's own forward"
    dispatch.report_once(key, f"lora_engine: {message}: {reason} (each reason is reported once)")


def _skip_reason(layer: BaseTunerLayer) -> Optional[str]:
    """Why a LoRA or IA3 layer is not patched at all (None when it is a type the fused classes cover)."""
    kind = type(layer)
    if kind in _ORIGINAL:
        return None
    if kind not in _FUSED:
        return f"{kind.__module__}.{kind.__qualname__} is not covered (only LoRA and IA3 over bnb 4-bit or nn.Linear)"
    if kind in (PeftLinear, PeftIA3Linear):
        base = layer.get_base_layer()
        if getattr(layer, "fan_in_fan_out", False) or not isinstance(base, nn.Linear):
            return f"base layer {type(base).__name__} stores its weight transposed (fan_in_fan_out)"
        if type(base).forward is not nn.Linear.forward:
            return f"base layer {type(base).__name__} has its own forward"
    return None


def _patch(model: nn.Module, entry: str, group_projections: bool = False) -> PatchReport:
    """Swap the classes of the PEFT LoRA layers and of the bitsandbytes 4-bit layers in ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{entry} needs a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport(grouping_requested=bool(group_projections))
    found_adapter = False
    fused_bases: set[int] = set()  # ids of the 4-bit bases the fused LoRA forward reads directly
    for name, module in model.named_modules():
        if not isinstance(module, (LoraLayer, IA3Layer)):
            continue
        found_adapter = True
        report.kinds.add("IA3" if isinstance(module, IA3Layer) else "LoRA")
        why_not = _skip_reason(module)
        if why_not is not None:
            report.skipped[name] = why_not
            continue
        if "forward" in vars(module):
            # A forward bound on the instance (e.g. an accelerate hook) would shadow the class's forward.
            report.skipped[name] = "forward is overridden on the instance (e.g. an accelerate hook)"
            continue
        module.__class__ = _FUSED.get(type(module), type(module))
        setattr(module, _PATCH_ATTR, (report, name))
        report.patched.append(name)
        fused_bases.add(id(module.get_base_layer()))
        reason = _layer_reason(module)
        if reason is not None:
            report.add_fallback(name, reason)
    found_4bit = False
    for name, module in model.named_modules():
        if bnb is None or not isinstance(module, bnb.nn.Linear4bit):
            continue
        found_4bit = True
        kind = type(module)
        if kind not in (bnb.nn.Linear4bit, FusedLinear4bit):
            report.base_skipped[name] = f"{kind.__module__}.{kind.__qualname__} is not covered (only bnb.nn.Linear4bit)"
            continue
        if "forward" in vars(module):
            report.base_skipped[name] = "forward is overridden on the instance (e.g. an accelerate hook)"
            continue
        module.__class__ = FusedLinear4bit
        setattr(module, _PATCH_ATTR, (report, name))
        if id(module) in fused_bases:
            report.lora_bases.append(name)
            continue
        report.base_patched.append(name)
        reason = _linear4bit_reason(module, sharded_ok=True) or _device_reason(module.weight.device)
        if reason is not None:
            report.add_base_fallback(name, reason)
    if not found_adapter and not found_4bit:
        raise ValueError(
            f"{entry} found no PEFT LoRA or IA3 layers and no bitsandbytes 4-bit layers (bnb.nn.Linear4bit) in the "
            "model: nothing runs lora_engine's kernels. Load the model in 4 bits "
            "(BitsAndBytesConfig(load_in_4bit=True)), or add LoRA with peft.get_peft_model(model, LoraConfig(...)) "
            "or PeftModel.from_pretrained(model, adapter_dir)"
        )
    from .grouped import patch_groups, unpatch_groups

    unpatch_groups(model)  # patching again, with or without grouping, starts from transformers' classes
    if group_projections:  # the attention and MLP modules, now that their layers are patched
        patch_groups(model, report)
    if report.fallbacks or report.skipped or report.base_fallbacks or report.base_skipped or report.group_skipped:
        dispatch.logger.warning("%s", report.summary())
    return report


def patch_peft_model(model: nn.Module, group_projections: bool = False) -> PatchReport:
    """Make ``model`` (a ``PeftModel``, or any module holding PEFT layers) run lora_engine's kernels: every PEFT
    LoRA or IA3 layer over a bnb 4-bit or nn.Linear base the fused kernels, every other bitsandbytes 4-bit layer
    (no adapter, a layer type not covered, prompt learning) lora_engine's 4-bit path. The same as :func:`patch_model`.

    ``group_projections=True`` also computes the q/k/v projections of each Llama, Mistral or Qwen2 attention
    block, and the gate/up projections of each MLP, together (one decode buffer, one GEMM over the decoded
    weights, one product of x with the stacked LoRA A factors; see ``lora_engine.grouped``) where every
    projection of the group is a patched 4-bit layer. Opt-in: not yet measured on a GPU; the default flips once
    ``python -m bench.e2e`` shows it wins.

    Changed in place (calling this again is harmless). Returns a :class:`PatchReport`; layers that will run
    PEFT's or bitsandbytes' forward are logged once. Raises where the model holds neither kind of layer.
    """
    return _patch(model, "patch_peft_model", group_projections)


def patch_model(model: nn.Module, group_projections: bool = False) -> PatchReport:
    """Make every bitsandbytes 4-bit layer of ``model`` run lora_engine's 4-bit path (and PEFT LoRA / IA3 layers,
    where there are any, the fused kernels): the same as :func:`patch_peft_model`, for a model with or without PEFT,
    ``group_projections`` included. :func:`unpatch_model` restores it."""
    return _patch(model, "patch_model", group_projections)


def _unpatch(model: nn.Module, entry: str) -> tuple[int, int]:
    """Give the patched layers their classes back: (LoRA layers restored, 4-bit layers restored)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{entry} needs a torch.nn.Module, got {type(model).__name__}")
    from .grouped import unpatch_groups

    unpatch_groups(model)
    lora = base = 0
    for module in model.modules():
        if FusedLinear4bit is not None and type(module) is FusedLinear4bit:
            module.__class__ = bnb.nn.Linear4bit
            vars(module).pop(_PATCH_ATTR, None)
            base += 1
            continue
        original = _ORIGINAL.get(type(module))
        if original is not None:
            module.__class__ = original
            vars(module).pop(_PATCH_ATTR, None)
            lora += 1
    return lora, base


def unpatch_peft_model(model: nn.Module) -> int:
    """Give every patched layer in ``model`` its class back (PEFT's for LoRA layers, ``bnb.nn.Linear4bit`` for
    the 4-bit ones); returns how many LoRA layers were restored."""
    return _unpatch(model, "unpatch_peft_model")[0]


def unpatch_model(model: nn.Module) -> int:
    """Undo :func:`patch_model` (or :func:`patch_peft_model`); returns how many layers were restored, LoRA and
    4-bit layers together."""
    return sum(_unpatch(model, "unpatch_model"))


def _fused_dispatch(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> Optional[nn.Module]:
    """A PEFT custom-module dispatcher: PEFT's own layer for ``target``, in its fused class when covered.

    Returns None for anything else, so PEFT's remaining dispatchers (8-bit, GPTQ, ...) handle it as usual.
    """
    from peft.tuners.lora.layer import dispatch_default

    new_module = None
    if PeftLinear4bit is not None and kwargs.get("loaded_in_4bit", False):
        from peft.tuners.lora.bnb import dispatch_bnb_4bit

        new_module = dispatch_bnb_4bit(target, adapter_name, config=config, **kwargs)
    if new_module is None and kwargs.get("parameter_name") is None:
        base = target.get_base_layer() if isinstance(target, LoraLayer) else target
        is_bnb = bnb is not None and isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward and not is_bnb:
            new_module = dispatch_default(target, adapter_name, config=config, **kwargs)
    if new_module is not None and type(new_module) in _FUSED and _skip_reason(new_module) is None:
        new_module.__class__ = _FUSED[type(new_module)]
    return new_module


def register_fused_layers(config: Any) -> Any:
    """Make ``get_peft_model(model, config)`` build fused LoRA layers directly; returns ``config``.

    Uses ``LoraConfig._register_custom_module`` (experimental in PEFT). The registration is not saved with the
    adapter: a model reloaded with ``PeftModel.from_pretrained`` needs :func:`patch_peft_model`.
    """
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_fused_layers needs a peft.LoraConfig, got {type(config).__name__}")
    dispatcher: Callable[..., Optional[nn.Module]] = _fused_dispatch
    config._register_custom_module({nn.Linear: dispatcher})
    return config

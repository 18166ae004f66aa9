"""Grouped projections for ``patch_peft_model(model, group_projections=True)`` / ``patch_model(...)``.

The q/k/v projections of an attention block and the gate/up projections of an MLP read the same input. Patching
swaps the ``__class__`` of each Llama, Mistral and Qwen2 attention and MLP module (transformers' own classes,
whose forwards call each projection on the block's input unchanged) to a subclass overriding ``forward`` only:
it computes the group's outputs in one pass (``lora_engine.grouped``: one decode buffer, one GEMM over the
decoded weights, one product of x with the stacked LoRA A factors), then runs the module's ORIGINAL forward,
in which each projection layer returns its precomputed output when called on exactly that input tensor. The
outputs live in a context variable (``peft.PRECOMPUTED``) for the duration of that forward, so threads and
asyncio tasks calling the same model see only their own. transformers' attention code (RoPE, cache, attention
implementations) runs unchanged, whatever its version.

A module is grouped when every projection of its group is a patched bitsandbytes 4-bit layer: a PEFT LoRA layer
over a 4-bit base, or a 4-bit layer without an adapter (it takes part in the base GEMM only). A call is grouped
when every member would run lora_engine's path for it (the per-layer checks: one active vanilla adapter, not
merged or disabled, weights readable, ...) and no path is forced (``lora_engine.force_path``); otherwise the
original forward runs per layer, recorded in the report and logged once. LoRA dropout in training is drawn per
member, as PEFT's per-layer dropout modules draw it; the seeds come from torch's CPU generator in the order the
per-layer calls would draw them. Under
``torch.compile`` the per-layer path runs (it compiles without graph breaks). The parameters, state dict and
saved adapters are PEFT's, unchanged; unpatching gives every module its class back.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .. import dispatch
from ..grouped import GroupMember, grouped_lora_linear_4bit
from ..validation import ACTIVATION_DTYPES
from . import peft as _peft

__all__ = ["patch_groups", "unpatch_groups"]

_GROUP_ATTR = "_lora_engine_group"  # (report, module name, member attribute names) on each grouped module

_FAMILIES = ("Llama", "Mistral", "Qwen2")
# (member attributes, class-name suffix, what the block is called)
_GROUPS = (
    (("q_proj", "k_proj", "v_proj"), "Attention", "attention"),
    (("gate_proj", "up_proj"), "MLP", "MLP"),
)

_GROUPED_CLASSES: dict[type, type] = {}  # original class -> its grouped subclass
_ORIGINAL_CLASSES: dict[type, type] = {}  # and back


class _GroupedForward:
    """The forward of a grouped attention or MLP module; everything else is transformers'."""

    def _get_name(self) -> str:
        return _ORIGINAL_CLASSES[type(self)].__name__  # the module repr keeps transformers' name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return super().forward(*args, **kwargs)
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        table = _group_outputs(self, x)
        if table is None:
            return super().forward(*args, **kwargs)
        outer = _peft.PRECOMPUTED.get()
        token = _peft.PRECOMPUTED.set({**outer, **table} if outer else table)
        try:
            return super().forward(*args, **kwargs)
        finally:
            _peft.PRECOMPUTED.reset(token)


def _grouped_class(original: type) -> type:
    kind = _GROUPED_CLASSES.get(original)
    if kind is None:
        kind = type(f"Grouped{original.__name__}", (_GroupedForward, original), {"__module__": __name__})
        _GROUPED_CLASSES[original], _ORIGINAL_CLASSES[kind] = kind, original
    return kind


def _member_plan(layer: nn.Module, x: torch.Tensor) -> tuple[Optional[GroupMember], Optional[torch.dtype], str]:
    """(the layer as a group member, its compute dtype, "") or (None, None, why it must run its own forward)."""
    if layer._forward_pre_hooks:
        # e.g. PEFT's adapter_names hook, which passes arguments the precomputed output would ignore
        return None, None, "the layer has forward pre-hooks"
    if type(layer) is _peft.FusedLoraLinear4bit:
        base = _peft._base_layer(layer)
        layer._check_base(base)
        adapter, compute, reason = layer._fused_plan(x, (), {}, base)
        if reason is not None:
            return None, None, reason
        if layer.use_dora.get(adapter, False):
            return None, None, "a DoRA adapter (its output is scaled row by row, layer by layer)"
        if layer._through_modules(adapter):
            # several adapters drawing dropout, or LoRA modules FSDP1 wraps on their own
            return None, None, "left factors made by the LoRA modules' own forwards"
        lora_A, lora_B, scaling, p, training, bias = layer._lora_args(adapter, _peft._attr(base, "bias"))
        member = GroupMember(_peft._attr(base, "weight"), _peft._quant_state(base), lora_A, lora_B, scaling, bias,
                             dropout_p=p if training else 0.0)  # fmt: skip
        return member, compute, ""
    if type(layer) is _peft.FusedLinear4bit:
        compute, reason = layer._plan(x)  # the checks of its own forward
        if reason is not None:
            return None, None, reason
        member = GroupMember(_peft._attr(layer, "weight"), _peft._quant_state(layer), bias=_peft._attr(layer, "bias"))
        return member, compute, ""
    return None, None, f"a {type(layer).__name__} layer"  # changed since patching


def _group_outputs(module: nn.Module, x: Any) -> Optional[dict]:
    """{member layer: (x, its output)} for this call, or None (reported) where the group runs per layer."""
    report, name, attrs = getattr(module, _GROUP_ATTR)
    reason = None
    forced = dispatch._current_settings()[1]
    if forced is not None:  # the grouped computation is an algorithm of its own: a forced path is per layer
        reason = f"the {forced!r} path is forced (lora_engine.force_path)"
    elif not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES:
        reason = f"input of type {type(x).__name__} and dtype {getattr(x, 'dtype', None)}"
    layers = [getattr(module, attr) for attr in attrs]
    members, compute = [], None
    for attr, layer in zip(attrs, layers):
        if reason is not None:
            break
        member, dtype, why = _member_plan(layer, x)
        if member is None:
            reason = f"{attr}: {why}"
        elif compute is not None and dtype != compute:
            reason = f"the projections compute in different dtypes ({compute}, {dtype})"
        compute = dtype
        members.append(member)
    if reason is not None:
        _note_group_fallback(report, name, reason)
        return None
    outputs = grouped_lora_linear_4bit(x.to(compute), members)
    return {layer: (x, y.to(x.dtype)) for layer, y in zip(layers, outputs)}  # bitsandbytes returns x's dtype


def _note_group_fallback(report: Any, name: str, reason: str) -> None:
    if reason in report.group_fallbacks.get(name, ()):
        return
    report.add_group_fallback(name, reason)
    dispatch.report_once(
        f"group-fallback:{reason}",
        f"lora_engine: the projections of {name} run per layer: {reason} (each reason is reported once)",
    )


def _group_reason(module: nn.Module, attrs: tuple[str, ...], suffix: str, label: str) -> Optional[str]:
    """Why ``module`` (holding the projections ``attrs``) cannot be grouped (None when it can)."""
    kind = _ORIGINAL_CLASSES.get(type(module), type(module))
    family = kind.__module__.startswith("transformers.models.") and kind.__name__ in {f + suffix for f in _FAMILIES}
    if not family:
        return (
            f"{kind.__module__}.{kind.__qualname__} is not a Llama, Mistral or Qwen2 {label} block (the forwards "
            "known to call each projection on the block's input)"
        )
    if "forward" in vars(module):
        return "forward is overridden on the instance (e.g. an accelerate hook)"
    for attr in attrs:
        layer = getattr(module, attr)
        if type(layer) not in (_peft.FusedLoraLinear4bit, _peft.FusedLinear4bit):
            kind = type(layer)
            return f"{attr} is a {kind.__module__}.{kind.__qualname__}, not a patched bitsandbytes 4-bit layer"
    return None


def patch_groups(model: nn.Module, report: Any) -> int:
    """Give the Llama / Mistral / Qwen2 attention and MLP modules of ``model`` whose projections are all patched
    4-bit layers the grouped forward; record them (and the modules left per layer, with why) in ``report``.
    Returns how many modules were grouped."""
    grouped = 0
    for name, module in model.named_modules():
        for attrs, suffix, label in _GROUPS:
            if not all(isinstance(getattr(module, attr, None), nn.Module) for attr in attrs):
                continue
            reason = _group_reason(module, attrs, suffix, label)
            if reason is not None:
                report.group_skipped[name] = reason
                continue
            original = _ORIGINAL_CLASSES.get(type(module), type(module))
            module.__class__ = _grouped_class(original)
            setattr(module, _GROUP_ATTR, (report, name, attrs))
            report.grouped[name] = [f"{name}.{attr}" for attr in attrs]
            grouped += 1
    return grouped


def unpatch_groups(model: nn.Module) -> int:
    """Give every grouped module in ``model`` its class back; returns how many."""
    restored = 0
    for module in model.modules():
        original = _ORIGINAL_CLASSES.get(type(module))
        if original is not None:
            module.__class__ = original
            vars(module).pop(_GROUP_ATTR, None)
            restored += 1
    return restored

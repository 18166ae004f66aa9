"""LoRA adapters without PEFT's wrappers: put lora_engine layers into any model; save and load PEFT adapters.

``inject(model, target_modules, r, ...)`` replaces the matching ``nn.Linear`` / ``bitsandbytes.nn.Linear4bit``
modules in place with :class:`~lora_engine.LoRALinear` / :class:`~lora_engine.LoRALinear4bit` sharing their
weights, and freezes everything else. Module names match as in PEFT: a list matches a name equal to an entry
or ending in ``"." + entry``; a string is a regular expression matched against the full name;
``"all-linear"`` takes every linear layer but the output head.

``save_adapter`` writes PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight``), which ``peft.PeftModel.from_pretrained`` loads onto the same
base model; ``load_adapter`` reads adapters saved by PEFT or by ``save_adapter``. Several adapters live on one
base: ``load_adapter(..., adapter_name=...)`` adds one, ``set_adapter`` switches, the base weights stay put.
"""

from __future__ import annotations

import collections
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Union

import torch
from torch import nn

from ..modules import LoRALinear, LoRALinear4bit, _LoRAAdapter

__all__ = [
    "ParameterCount",
    "delete_adapter",
    "inject",
    "load_adapter",
    "lora_layers",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"  # older PEFT adapters
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel) .model (the base model)
ALL_LINEAR = "all-linear"
# Heads that "all-linear" leaves alone when the model has no output embeddings: PEFT's SEQ_CLS_HEAD_NAMES.
# A freshly initialised head is trained whole, not through a low-rank update.
CLASSIFIER_HEADS = ("score", "classifier")
# LoraConfig fields whose non-default values change what an adapter computes in ways these layers do not.
_UNSUPPORTED_CONFIG = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
}

TargetModules = Union[str, Iterable[str]]


def lora_layers(model: nn.Module) -> dict[str, _LoRAAdapter]:
    """Every lora_engine LoRA layer in ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _LoRAAdapter)}


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    import bitsandbytes as bnb  # imported here: bitsandbytes takes a moment to load and dense models need none of it

    return isinstance(module, bnb.nn.Linear4bit)


def _unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot carry a LoRA layer here (None when it can)."""
    if isinstance(module, _LoRAAdapter) or _is_bnb_linear4bit(module) or type(module) is nn.Linear:
        return None
    if type(module).__name__ == "Conv1D":
        return "a transformers Conv1D (GPT-2 style, weight stored [in, out]), which lora_engine does not wrap"
    if isinstance(module, nn.Linear):
        # a subclass may compute differently from its weight (e.g. int8 bitsandbytes layers, or an attention
        # module reading out_proj.weight directly): wrapping it could silently drop the adapter
        return f"a {type(module).__name__} (an nn.Linear subclass lora_engine does not know how to wrap)"
    return f"a {type(module).__name__}; lora_engine wraps nn.Linear and bitsandbytes Linear4bit"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _LoRAAdapter)) or type(module).__name__ == "Conv1D"


def _head_prefixes(model: nn.Module) -> list[str]:
    """Names of the output head(s) "all-linear" skips: the output embeddings (language-model head), else a
    classification head named as in PEFT."""
    heads = []
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        output = get_output() if callable(get_output) else None
    except (NotImplementedError, AttributeError):  # models that do not say
        output = None
    if output is None:
        output = next(
            (getattr(model, n) for n in CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)), None
        )
    if output is not None:
        heads = [name for name, module in model.named_modules() if module is output]
    return heads


def _matches(name: str, target_modules: TargetModules) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name; a list matches by name or dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _resolve_targets(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """The names of the modules ``target_modules`` selects; raises when none, or one that cannot be wrapped."""
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = _head_prefixes(model)
        names = [
            name
            for name, module in model.named_modules()
            if name and _is_linear(module) and not any(name == h or name.startswith(h + ".") for h in heads)
        ]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
            if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
                raise ValueError(f"target_modules must be non-empty module names, got {target_modules!r}")
        names = [name for name, _ in model.named_modules() if name and _matches(name, target_modules)]
    if not names:
        raise ValueError(
            f"no module of the model matched target_modules={target_modules!r} (names match as in PEFT: a list by "
            "exact name or dotted suffix, e.g. 'q_proj'; a string as a regex over the full name; or 'all-linear')"
        )
    modules = dict(model.named_modules())
    for name in names:
        reason = _unsupported_reason(modules[name])
        if reason is not None:
            raise TypeError(f"target module {name!r} is {reason}; leave it out of target_modules")
    return names


def _wrap(
    model: nn.Module,
    name: str,
    adapter_name: str,
    r: int,
    lora_alpha: Optional[float],
    lora_dropout: float,
    use_rslora: bool,
    lora_dtype: torch.dtype,
) -> _LoRAAdapter:
    """Give module ``name`` adapter ``adapter_name`` (parked if the module is already a LoRA layer)."""
    module = model.get_submodule(name)
    kwargs = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, lora_dtype=lora_dtype)
    if isinstance(module, _LoRAAdapter):
        module.add_adapter(adapter_name, **kwargs)
        return module
    reason = _unsupported_reason(module)
    if reason is not None:
        raise TypeError(f"module {name!r} is {reason}")
    if _is_bnb_linear4bit(module):
        layer = LoRALinear4bit.from_bnb(module, adapter_name=adapter_name, **kwargs)
    else:
        layer = LoRALinear.from_linear(module, adapter_name=adapter_name, **kwargs)
    layer.train(module.training)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def _adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def _active_adapter(model: nn.Module) -> Optional[str]:
    """The model's active adapter: the one active on its LoRA layers (None when none is)."""
    active = {layer.active_adapter for layer in lora_layers(model).values()} - {None}
    if len(active) > 1:
        raise ValueError(f"the model's LoRA layers have different active adapters {sorted(active)}; call set_adapter")
    return next(iter(active), None)


def _check_new_name(model: nn.Module, adapter_name: str) -> None:
    if adapter_name in _adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another adapter_name")


def _freeze_all_but_active(model: nn.Module, trainable: bool) -> None:
    model.requires_grad_(False)
    if trainable:
        for layer in lora_layers(model).values():
            if layer.lora_A is not None:
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)


def inject(
    model: nn.Module,
    target_modules: TargetModules,
    r: int = 8,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.0,
    adapter_name: str = "default",
    use_rslora: bool = False,
    *,
    lora_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Put a LoRA adapter on the modules ``target_modules`` names and make it the one trained; returns ``model``.

    ``nn.Linear`` modules become :class:`LoRALinear` and ``bitsandbytes.nn.Linear4bit`` modules
    :class:`LoRALinear4bit`, sharing the base weight and bias (nothing is copied). On a model that already has
    adapters, matching LoRA layers get one more. Afterwards ``adapter_name`` is the active adapter and its
    ``lora_A`` / ``lora_B`` are the only parameters that require grad. ``lora_alpha`` defaults to ``r``.

    HF Trainer refuses to train a transformers model loaded in 4 bits unless PEFT wraps it; there, use PEFT and
    :func:`lora_engine.patch_peft_model`. ``inject`` is for custom training loops and models outside transformers.
    """
    _check_new_name(model, adapter_name)
    names = _resolve_targets(model, target_modules)
    for name in names:
        _wrap(model, name, adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)
    set_adapter(model, adapter_name)
    _freeze_all_but_active(model, trainable=True)
    return model


def set_adapter(model: nn.Module, adapter_name: str, inference_mode: bool = False) -> None:
    """Make ``adapter_name`` the active adapter of every LoRA layer (layers without it run their base alone).

    As in PEFT, the active adapter's weights require grad unless ``inference_mode``; the others never do.
    Nothing is reloaded: the layers swap which of their adapter tensors they use.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no lora_engine LoRA layers: call inject() or load_adapter() first")
    known = _adapter_names(model)
    if adapter_name not in known:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has adapters {known}")
    for layer in layers.values():
        layer.set_adapter(adapter_name if adapter_name in layer.adapter_names else None)
        for name in layer.adapter_names:
            weights = layer.get_adapter(name)
            trainable = name == adapter_name and not inference_mode
            weights.lora_A.requires_grad_(trainable)
            weights.lora_B.requires_grad_(trainable)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer. Layers left without any adapter stay LoRA layers running their
    base alone; ``merge_and_unload`` turns them back into plain linear layers."""
    known = _adapter_names(model)
    if adapter_name not in known:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has adapters {known}")
    for layer in lora_layers(model).values():
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer with an ``nn.Linear`` holding ``W + scaling·B·A`` of its active adapter.

    4-bit layers become dense layers in their compute dtype (PEFT re-quantizes the merged weight to 4 bits
    instead, which rounds it once more). Returns ``model``.
    """
    for name, layer in lora_layers(model).items():
        merged = layer.merge()
        merged.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        if not name:
            raise ValueError("the model itself is a LoRA layer: call its merge() instead")
        setattr(model.get_submodule(parent_name), child, merged)
    return model


# ---------------------------------------------------------------------------------------------- save and load


def _target_modules_for(model: nn.Module, names: list[str]) -> list[str]:
    """What to write as ``target_modules``: the last name components if PEFT's suffix match of those selects
    exactly ``names`` in this model (as PEFT itself writes them), else the full names."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    selected = {name for name, _ in model.named_modules() if name and _matches(name, suffixes)}
    return suffixes if selected == set(names) else sorted(names)


def _most_common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _pattern_lookup(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern rule: the first key ``k`` such that ``(.*\\.)?(k)$`` matches the name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _model_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def save_adapter(model: nn.Module, save_directory: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) in PEFT's format; returns the directory.

    ``adapter_config.json`` is a LoRA config that ``peft.PeftModel.from_pretrained(base_model, save_directory)``
    reads to put the same adapter on the same base model; ``adapter_model.safetensors`` holds
    ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r) for each layer.
    Per-layer ranks or alphas that differ from the common one go to ``rank_pattern`` / ``alpha_pattern``.
    """
    from safetensors.torch import save_file

    if adapter_name is None:
        adapter_name = _active_adapter(model)
        if adapter_name is None:
            raise ValueError("the model has no active adapter to save: pass adapter_name, or inject() one first")
    layers = {name: layer for name, layer in lora_layers(model).items() if adapter_name in layer.adapter_names}
    if not layers:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has adapters {_adapter_names(model)}")
    if "" in layers:
        raise ValueError("the model itself is a LoRA layer; PEFT adapters address layers inside a model")
    weights = {name: layer.get_adapter(adapter_name) for name, layer in layers.items()}
    if len({w.use_rslora for w in weights.values()}) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes rsLoRA and plain LoRA layers, which a PEFT config cannot say")
    r = _most_common([w.r for w in weights.values()])
    alpha = _most_common([w.lora_alpha for w in weights.values()])
    dropouts = {w.lora_dropout for w in weights.values()}
    if len(dropouts) > 1:  # a PEFT config holds one dropout rate; it only matters for training
        warnings.warn(
            f"adapter {adapter_name!r} has several lora_dropout values {sorted(dropouts)}; saving the most common"
        )
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": _model_name(model),
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": _most_common([w.lora_dropout for w in weights.values()]),
        "use_rslora": next(iter(weights.values())).use_rslora,
        "target_modules": _target_modules_for(model, list(layers)),
        "rank_pattern": {re.escape(n): w.r for n, w in weights.items() if w.r != r},
        "alpha_pattern": {re.escape(n): w.lora_alpha for n, w in weights.items() if w.lora_alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    tensors = {}
    for name, w in weights.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = w.lora_A.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = w.lora_B.detach().to("cpu").contiguous()
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a PEFT adapter directory")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters load here")
    for key, defaults in _UNSUPPORTED_CONFIG.items():
        if config.get(key, defaults[0]) not in defaults:
            raise NotImplementedError(
                f"{config_path}: {key}={config[key]!r} is not supported by lora_engine.load_adapter "
                "(load it with PEFT and use lora_engine.patch_peft_model instead)"
            )
    if (directory / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / WEIGHTS_NAME))
    elif (directory / WEIGHTS_NAME_BIN).is_file():
        state = torch.load(directory / WEIGHTS_NAME_BIN, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN}")
    return config, state


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _group_weights(state: dict[str, torch.Tensor], source: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"A": lora_A, "B": lora_B}} from PEFT's keys."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise NotImplementedError(f"{source}: unexpected tensor {key!r} (lora_engine loads LoRA A/B weights only)")
        grouped.setdefault(match["module"], {})[match["which"]] = tensor
    for name, pair in grouped.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{source}: module {name!r} has lora_{next(iter(pair))} but not its partner")
    if not grouped:
        raise ValueError(f"{source}: the adapter holds no LoRA weights")
    return grouped


def load_adapter(
    model: nn.Module,
    adapter_path: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    lora_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Read a PEFT LoRA adapter (saved by PEFT or by :func:`save_adapter`) into ``model``; returns ``model``.

    On a model without lora_engine layers the adapter is injected where its weights say (its config gives
    alpha, dropout, rsLoRA and the rank/alpha patterns) and becomes active, everything else frozen, as
    ``PeftModel.from_pretrained``. On a model that has adapters it is added under ``adapter_name`` and the
    active adapter stays as it was (``set_adapter`` switches), as ``PeftModel.load_adapter``. Its weights
    require grad only if ``is_trainable`` (and it is active).
    """
    directory = Path(adapter_path)
    config, state = _read_adapter(directory)
    grouped = _group_weights(state, directory)
    _check_new_name(model, adapter_name)
    fresh = not lora_layers(model)
    previous = None if fresh else _active_adapter(model)
    modules = dict(model.named_modules())
    for name in grouped:
        if name not in modules:
            raise ValueError(
                f"{directory}: the adapter has weights for module {name!r}, which the model does not have "
                "(is this the base model the adapter was trained on?)"
            )
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0))
    for name, pair in grouped.items():
        lora_A, lora_B = pair["A"], pair["B"]
        r = _pattern_lookup(rank_pattern, name, r_default)
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != r or lora_B.shape[1] != r:
            raise ValueError(
                f"{directory}: module {name!r} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}, "
                f"but its rank per the config is {r}"
            )
        alpha = float(_pattern_lookup(alpha_pattern, name, alpha_default))
        layer = _wrap(model, name, adapter_name, r, alpha, dropout, use_rslora, lora_dtype)
        target = layer.get_adapter(adapter_name)
        if target.lora_A.shape != lora_A.shape or target.lora_B.shape != lora_B.shape:
            raise ValueError(
                f"{directory}: module {name!r} is [{layer.out_features}, {layer.in_features}] but the adapter's "
                f"lora_A is {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}"
            )
        with torch.no_grad():
            target.lora_A.copy_(lora_A)
            target.lora_B.copy_(lora_B)
    if fresh:
        set_adapter(model, adapter_name, inference_mode=not is_trainable)
        _freeze_all_but_active(model, trainable=is_trainable)
    elif previous is not None:
        set_adapter(model, previous)  # new layers made for this adapter start with it active; undo that
    else:
        for layer in lora_layers(model).values():
            layer.set_adapter(None)
    return model


# ------------------------------------------------------------------------------------------------ parameters


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts, as PEFT's ``get_nb_trainable_parameters`` returns them."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte of quant_storage: count them as PEFT does (elements x 2 x
    # bytes per element), so a 4-bit model reports its logical size
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def print_trainable_parameters(model: nn.Module) -> ParameterCount:
    """Print ``trainable params: … || all params: … || trainable%: …`` as PEFT does, and return the counts.

    Parameters shared between modules count once; parked (inactive) adapters count in the total but not as
    trainable, like PEFT's inactive adapters.
    """
    trainable = total = 0
    for param in model.parameters():
        n = _numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    for layer in lora_layers(model).values():
        for name in layer.adapter_names:
            if name != layer.active_adapter:
                w = layer.get_adapter(name)
                total += w.lora_A.numel() + w.lora_B.numel()
    count = ParameterCount(trainable, total)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {count.percent:.4f}")
    return count

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

``inject`` and ``load_adapter`` are all or nothing: they check everything before changing the model, and undo what
they changed if a later step still fails. ``load_adapter`` honours every ``LoraConfig`` field that decides what the
adapter computes, refuses by name those it does not implement (``_LORA_CONFIG_FIELDS``), and warns about keys that
are no ``LoraConfig`` field, as PEFT does.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Union

import torch
from torch import nn

from ..format import weight_shape
from ..modules import LoRALinear, LoRALinear4bit, _check_adapter_name, _LoRAAdapter

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


def _all_linear(model: nn.Module) -> list[str]:
    """The modules "all-linear" selects: every linear layer but the output head."""
    heads = _head_prefixes(model)
    return [
        name
        for name, module in model.named_modules()
        if name and _is_linear(module) and not any(name == h or name.startswith(h + ".") for h in heads)
    ]


def _resolve_targets(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """The names of the modules ``target_modules`` selects; raises when none, or one that cannot be wrapped."""
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        names = _all_linear(model)
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


class _Undo:
    """How to take back changes to a model: the steps recorded as they are made, plus each LoRA layer's active
    adapter and every parameter's requires_grad (parked adapters' included) as they were when this was made."""

    def __init__(self, model: nn.Module) -> None:
        self.steps: list[Callable[[], None]] = []
        self.active = [(layer, layer.active_adapter) for layer in lora_layers(model).values()]
        self.requires_grad = [(param, param.requires_grad) for param in _all_parameters(model)]

    def add(self, step: Callable[[], None]) -> None:
        self.steps.append(step)

    def restore_flags(self) -> None:
        """Each LoRA layer that existed back on its active adapter, every parameter that existed back to its flag."""
        for layer, name in self.active:
            layer.set_adapter(name)
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)

    def rollback(self) -> None:
        for step in reversed(self.steps):
            step()
        self.restore_flags()


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module) -> Iterator[_Undo]:
    """Run the block's changes to ``model``; if it raises, take them all back before the error propagates."""
    undo = _Undo(model)
    try:
        yield undo
    except BaseException:
        undo.rollback()
        raise


def _all_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and its LoRA layers' parked adapters (which ``parameters()`` does not list)."""
    params = list(model.parameters())
    for layer in lora_layers(model).values():
        for name in layer.adapter_names:
            if name != layer.active_adapter:
                weights = layer.get_adapter(name)
                params += [weights.lora_A, weights.lora_B]
    return params


def _wrap(
    model: nn.Module,
    name: str,
    adapter_name: str,
    r: int,
    lora_alpha: Optional[float],
    lora_dropout: float,
    use_rslora: bool,
    lora_dtype: torch.dtype,
    undo: _Undo,
) -> _LoRAAdapter:
    """Give module ``name`` adapter ``adapter_name`` (parked if the module is already a LoRA layer), recording in
    ``undo`` how to take it back."""
    module = model.get_submodule(name)
    kwargs = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, lora_dtype=lora_dtype)
    if isinstance(module, _LoRAAdapter):

        def remove(layer: _LoRAAdapter = module) -> None:
            if adapter_name in layer.adapter_names:  # add_adapter may have failed before adding it
                layer.delete_adapter(adapter_name)

        undo.add(remove)
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
    parent = model.get_submodule(name.rpartition(".")[0])
    child = name.rpartition(".")[2]
    setattr(parent, child, layer)
    undo.add(lambda: setattr(parent, child, module))
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

    All or nothing: if wrapping a module fails, the modules already wrapped are put back and the model is as it
    was. HF Trainer refuses to train a transformers model loaded in 4 bits unless PEFT wraps it; there, use PEFT and
    :func:`lora_engine.patch_peft_model`. ``inject`` is for custom training loops and models outside transformers.
    """
    _check_new_name(model, adapter_name)
    names = _resolve_targets(model, target_modules)
    with _all_or_nothing(model) as undo:
        for name in names:
            _wrap(model, name, adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_dtype, undo)
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


class _Field(NamedTuple):
    """How ``load_adapter`` treats one field of PEFT's ``LoraConfig``."""

    handling: str  # "implemented", "harmless" (does not change what the loaded adapter computes) or "refused"
    why: str = ""
    no_op: tuple[Any, ...] = ()  # a refused field still loads when its value is one of these


def _implemented(why: str = "") -> _Field:
    return _Field("implemented", why)


def _harmless(why: str = "") -> _Field:
    return _Field("harmless", why)


def _refused(why: str, *no_op: Any) -> _Field:
    return _Field("refused", why, no_op)


# init_lora_weights values that only set initial values, which the loaded weights overwrite
_INITS_OVERWRITTEN = (True, False, "gaussian", "eva", "orthogonal")
# Every field of peft.LoraConfig and its PeftConfig bases (PEFT 0.21.2), decided from what PEFT does with it when it
# loads an adapter onto nn.Linear / Linear4bit layers. tests/integrations/test_adapter_loading.py fails when PEFT
# has a field this table lacks, and checks the harmless ones against PEFT's outputs.
_LORA_CONFIG_FIELDS: dict[str, _Field] = {
    "peft_type": _implemented("must be LORA"),
    "r": _implemented(),
    "lora_alpha": _implemented(),
    "lora_dropout": _implemented(),
    "use_rslora": _implemented(),
    "rank_pattern": _implemented(),
    "alpha_pattern": _implemented(),
    "target_modules": _implemented("the modules it selects must be exactly those the weights name"),
    "exclude_modules": _implemented("as target_modules"),
    "layers_to_transform": _implemented("keeps only these layer indices, as PEFT's check_target_module_exists"),
    "layers_pattern": _implemented("the ModuleList layers_to_transform indexes"),
    "task_type": _harmless("picks PEFT's model wrapper; the classifier head it trains comes as modules_to_save"),
    "auto_mapping": _harmless("the base model's class, for AutoPeftModel"),
    "peft_version": _harmless(),
    "base_model_name_or_path": _harmless("the caller passes the base model"),
    "revision": _harmless("the caller passes the base model"),
    "inference_mode": _harmless("PEFT's from_pretrained replaces it by not is_trainable, as load_adapter does"),
    "fan_in_fan_out": _harmless("PEFT resets it on nn.Linear, ignores it on Linear4bit; Conv1D is not wrapped here"),
    "eva_config": _harmless("sets initial values only; the ranks EVA chose are in rank_pattern"),
    "loftq_config": _harmless("read only with init_lora_weights='loftq' (refused)"),
    "corda_config": _harmless("read only with init_lora_weights='corda' (refused)"),
    "lora_ga_config": _harmless("read only with init_lora_weights='lora_ga' (refused)"),
    "qalora_group_size": _harmless("read only with use_qalora (refused)"),
    "megatron_config": _harmless("read only to wrap Megatron parallel layers, which are refused by type"),
    "megatron_core": _harmless("as megatron_config"),
    "runtime_config": _harmless("never saved (PEFT drops it from a config file); it only speeds up DoRA's init"),
    "init_lora_weights": _refused(
        "PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ rewrite the base weight when PEFT loads the adapter, whose weights "
        "complete that rewritten base; MiCA keeps lora_B frozen in training",
        *_INITS_OVERWRITTEN,
    ),
    "bias": _refused("'all' and 'lora_only' train the base layers' biases, saved with the adapter", "none", None),
    "modules_to_save": _refused("trained copies of whole modules (a classifier head) replace the model's", None, []),
    "trainable_token_indices": _refused("trained embedding rows replace the model's", None, [], {}),
    "layer_replication": _refused("stacks copies of decoder layers, each with its own adapter", None, []),
    "target_parameters": _refused("LoRA on bare nn.Parameters (MoE experts), not on linear layers", None, []),
    "lora_bias": _refused("lora_B has a trained bias", False, None),
    "use_dora": _refused("DoRA rescales each output by a trained magnitude", False, None),
    "alora_invocation_tokens": _refused("aLoRA applies the adapter only from the invocation tokens on", None),
    "use_qalora": _refused(
        "QA-LoRA pools the input in groups of qalora_group_size before lora_A (PEFT: GPTQ layers only)", False, None
    ),
    "velora_config": _refused("VeLoRA trains through its own compressed-activation backward", None),
    "monteclora_config": _refused("MonteCLoRA perturbs the LoRA weights with Monte Carlo samples", None),
    "use_bdlora": _refused("BD-LoRA makes lora_A or lora_B block-diagonal, stored compactly", None),
    "arrow_config": _refused("Arrow routes each token among several adapters", None),
    "kasa_config": _refused("KaSA truncates the base weight's SVD and puts a trained diagonal between A and B", None),
    "ensure_weight_tying": _refused("ties the adapter of a tied output head to the embedding's", False, None),
}


def _check_config(config: dict[str, Any], config_path: Path) -> None:
    """Refuse a config whose adapter computes what these layers do not; warn about keys LoraConfig lacks."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters load here")
    for key, value in config.items():
        field = _LORA_CONFIG_FIELDS.get(key)
        if field is not None and field.handling == "refused" and value not in field.no_op:
            raise NotImplementedError(
                f"{config_path}: {key}={value!r} is not supported by lora_engine.load_adapter ({field.why}); load "
                "the adapter with PEFT (PeftModel.from_pretrained) and run lora_engine.patch_peft_model on the model"
            )
    unknown = sorted(set(config) - set(_LORA_CONFIG_FIELDS))
    if unknown:
        # PEFT drops such keys with a warning too (PeftConfigMixin.from_peft_type): a newer PEFT wrote them
        warnings.warn(
            f"{config_path}: ignoring {unknown}, which are no fields of PEFT's LoraConfig (written by a newer "
            "PEFT? if they change what the adapter computes, load it with that PEFT instead)",
            stacklevel=4,  # the line that called load_adapter
        )
    targets = config.get("target_modules")
    if isinstance(targets, str) and (config.get("layers_to_transform") is not None or config.get("layers_pattern")):
        raise ValueError(f"{config_path}: layers_to_transform and layers_pattern need a list of target_modules")
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        raise ValueError(f"{config_path}: layers_pattern is set but layers_to_transform is not")


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a PEFT adapter directory")
    config = json.loads(config_path.read_text())
    _check_config(config, config_path)
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
    keys: dict[tuple[str, str], str] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise NotImplementedError(f"{source}: unexpected tensor {key!r} (lora_engine loads LoRA A/B weights only)")
        if (match["module"], match["which"]) in keys:
            raise ValueError(f"{source}: {key!r} and {keys[match['module'], match['which']]!r} are the same weight")
        keys[match["module"], match["which"]] = key
        grouped.setdefault(match["module"], {})[match["which"]] = tensor
    for name, pair in grouped.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{source}: module {name!r} has lora_{next(iter(pair))} but not its partner")
        for which, tensor in pair.items():
            if not tensor.is_floating_point():
                raise ValueError(
                    f"{source}: module {name!r} has a {tensor.dtype} lora_{which}; LoRA weights are floating point"
                )
    if not grouped:
        raise ValueError(f"{source}: the adapter holds no LoRA weights")
    return grouped


def _layer_index(name: str, layers_pattern: Union[str, list[str], None]) -> Optional[int]:
    """The index after ``layers_pattern`` (default: the first numbered name component but the first), as PEFT."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns)), None)
    return None if match is None else int(match["idx"])


def _config_selects(config: dict[str, Any], name: str, all_linear: Iterable[str]) -> bool:
    """Whether PEFT puts the adapter on module ``name`` (peft.tuners.tuners_utils.check_target_module_exists).

    ``target_modules=None`` (PEFT then takes its architecture's defaults) leaves the choice to the weights, but
    exclude_modules and layers_to_transform still apply.
    """
    exclude = config.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str) else _matches(name, exclude)):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        # PEFT turns "all-linear" into the full names of the linear layers; a regex never meets layers_to_transform
        return name in all_linear if targets.lower() == ALL_LINEAR else re.fullmatch(targets, name) is not None
    if targets is not None and name in targets:
        return True  # a full name: PEFT applies no layer filter
    if targets is not None and not any(name.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(name, config.get("layers_pattern"))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


class _LayerLoad(NamedTuple):
    """One module's share of an adapter, checked against the model."""

    name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    r: int
    lora_alpha: float


def _features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a module ``_unsupported_reason`` accepts."""
    if isinstance(module, _LoRAAdapter):
        return module.out_features, module.in_features
    if _is_bnb_linear4bit(module):
        return weight_shape(module.weight, getattr(module.weight, "quant_state", None))  # raises if not quantized
    return tuple(module.weight.shape)


def _plan_load(
    model: nn.Module, directory: Path, config: dict[str, Any], grouped: dict[str, dict[str, torch.Tensor]]
) -> list[_LayerLoad]:
    """Check the adapter's every module against the model, changing nothing: it exists, can be wrapped, is selected by
    the config (and every module the config selects has weights), and its rank and shapes match."""
    modules = dict(model.named_modules())
    absent = [name for name in grouped if name not in modules]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise ValueError(
            f"{directory}: the adapter has weights for module {absent[0]!r}{more}, which the model does not have "
            "(is this the base model the adapter was trained on?)"
        )
    for name in grouped:
        reason = _unsupported_reason(modules[name])
        if reason is not None:
            raise TypeError(f"{directory}: module {name!r} is {reason}; lora_engine cannot put the adapter there")
    all_linear = set(_all_linear(model)) if isinstance(config.get("target_modules"), str) else set()
    candidates = grouped if config.get("target_modules") is None else [name for name in modules if name]
    selected = {name for name in candidates if _config_selects(config, name, all_linear)}
    selection = (
        ", ".join(
            f"{key}={config.get(key)!r}"
            for key in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
            if config.get(key) is not None
        )
        or "target_modules=None"
    )
    unselected = sorted(set(grouped) - selected)
    if unselected:
        raise ValueError(
            f"{directory}: the adapter has weights for modules its config does not select ({selection}): "
            f"{unselected}; PEFT would not put the adapter there"
        )
    unweighted = sorted(selected - set(grouped))
    if unweighted:
        raise ValueError(
            f"{directory}: its config ({selection}) selects modules the weights file has no LoRA weights for: "
            f"{unweighted}; is this the base model the adapter was trained on?"
        )

    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    plans = []
    for name, pair in grouped.items():
        lora_A, lora_B = pair["A"], pair["B"]
        r = _pattern_lookup(rank_pattern, name, r_default)
        alpha = _pattern_lookup(alpha_pattern, name, alpha_default)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{directory}: module {name!r} has rank {r!r} per the config; ranks are positive integers")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"{directory}: module {name!r} has lora_alpha {alpha!r} per the config; it is a number")
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != r or lora_B.shape[1] != r:
            raise ValueError(
                f"{directory}: module {name!r} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}, "
                f"but its rank per the config is {r}"
            )
        try:
            out_features, in_features = _features(modules[name])
        except (ValueError, TypeError) as error:
            raise type(error)(f"{directory}: module {name!r}: {error}") from error
        if lora_A.shape[1] != in_features or lora_B.shape[0] != out_features:
            raise ValueError(
                f"{directory}: module {name!r} is [{out_features}, {in_features}] but the adapter's lora_A is "
                f"{tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}"
            )
        plans.append(_LayerLoad(name, lora_A, lora_B, r, float(alpha)))
    return plans


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
    active adapter and every ``requires_grad`` stay as they were (``set_adapter`` switches), as
    ``PeftModel.load_adapter``. Its weights require grad only if ``is_trainable`` (and it is active).

    All or nothing: the config, every module the weights name (present, wrappable, selected by ``target_modules`` /
    ``exclude_modules`` / ``layers_to_transform``, rank and shapes matching) and every tensor (floating point) are
    checked before the model changes, and on any error the model is left as it was. Config fields that change what
    the adapter computes and are not implemented here raise ``NotImplementedError`` naming them.
    """
    directory = Path(adapter_path)
    config, state = _read_adapter(directory)
    grouped = _group_weights(state, directory)
    _check_adapter_name(adapter_name)
    _check_new_name(model, adapter_name)
    if not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
        raise ValueError(f"lora_dtype must be a floating-point torch.dtype, got {lora_dtype!r}")
    dropout, use_rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{directory}: lora_dropout is {dropout!r}; it must be in [0, 1)")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"{directory}: use_rslora is {use_rslora!r}; it must be true or false")
    plans = _plan_load(model, directory, config, grouped)

    fresh = not lora_layers(model)
    with _all_or_nothing(model) as undo:
        layers = []
        for plan in plans:
            layer = _wrap(
                model, plan.name, adapter_name, plan.r, plan.lora_alpha, dropout, use_rslora, lora_dtype, undo
            )
            target = layer.get_adapter(adapter_name)
            with torch.no_grad():
                target.lora_A.copy_(plan.lora_A)
                target.lora_B.copy_(plan.lora_B)
            layers.append(layer)
        if fresh:
            set_adapter(model, adapter_name, inference_mode=not is_trainable)
            _freeze_all_but_active(model, trainable=is_trainable)
        else:
            # as PEFT's load_adapter: the new adapter is parked everywhere (layers made for it start with it active)
            # and no flag that was set before changes
            undo.restore_flags()
            for layer in layers:
                if layer.active_adapter == adapter_name:
                    layer.set_adapter(None)
                weights = layer.get_adapter(adapter_name)
                weights.lora_A.requires_grad_(False)
                weights.lora_B.requires_grad_(False)
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

"""load_adapter is all or nothing, and every adapter-config field is honoured, harmless (checked against PEFT) or
refused by name.

The models are the tiny Llama of conftest (dense fp32, and NF4 through a BitsAndBytesConfig); the kernels are not
what is tested here, so everything runs on the torch reference.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import lora_engine
from lora_engine import LoRALinear, LoRALinear4bit
from lora_engine.integrations import adapters
from lora_engine.integrations.adapters import lora_layers
from lora_engine.modules import _LoRAAdapter

# Both sides compute in fp32 from the same weights; only the summation order differs (see test_adapters.py).
ATOL = RTOL = 1e-4
MIN_ADAPTER_EFFECT = 100 * ATOL
QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
QV_DOWN = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(autouse=True)
def _torch_backend():
    with lora_engine.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def load_base(tiny_llama_dir, load_4bit) -> Callable[[str], nn.Module]:
    """``load_base(kind)``: a fresh tiny Llama, "4bit" (NF4) or "dense" (fp32), in eval mode."""
    from transformers import AutoModelForCausalLM

    def load(kind: str) -> nn.Module:
        if kind == "4bit":
            return load_4bit().eval()
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    return load


def _save_peft_adapter(base: nn.Module, directory: Path, seed: int, **config: Any) -> None:
    """Save a stock PEFT LoRA adapter of ``base`` with lora_B randomized (a fresh one does nothing)."""
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(directory)


def _copy_adapter(
    source: Path,
    directory: Path,
    config: Optional[Callable[[dict], dict]] = None,
    weights: Optional[Callable[[dict], dict]] = None,
) -> Path:
    """A copy of the adapter at ``source`` with its config and/or weights rewritten."""
    shutil.copytree(source, directory)
    if config is not None:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if weights is not None:
        path = directory / "adapter_model.safetensors"
        save_file(weights(load_file(path)), path)
    return directory


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _peft_logits(base: nn.Module, ids: torch.Tensor, *adapters_: tuple[Path, str], active: str) -> torch.Tensor:
    """PEFT's logits with the given (directory, name) adapters loaded and ``active`` active."""
    (first, first_name), *rest = adapters_
    model = PeftModel.from_pretrained(base, first, adapter_name=first_name)
    for directory, name in rest:
        model.load_adapter(directory, adapter_name=name)
    model.set_adapter(active)
    return _logits(model.eval(), ids)


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was: the module objects, the state dict, every requires_grad
    (parked adapters' included), and each LoRA layer's adapters and active adapter."""
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, layer in lora_layers(model).items():
        for adapter in layer.adapter_names:
            weights = layer.get_adapter(adapter)
            grads[f"{name}[{adapter}].lora_A"] = weights.lora_A.requires_grad
            grads[f"{name}[{adapter}].lora_B"] = weights.lora_B.requires_grad
    return dict(
        modules=dict(model.named_modules()),
        state={k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()},
        grads=grads,
        adapters={name: (layer.adapter_names, layer.active_adapter) for name, layer in lora_layers(model).items()},
    )


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modules"].keys() == after["modules"].keys(), "modules were added or removed"
    replaced = [name for name, module in before["modules"].items() if after["modules"][name] is not module]
    assert not replaced, f"modules replaced by other objects: {replaced}"
    assert before["state"].keys() == after["state"].keys(), "the state dict has other keys"
    changed = [k for k, v in before["state"].items() if torch.is_tensor(v) and not torch.equal(v, after["state"][k])]
    assert not changed, f"state dict values changed: {changed}"
    flipped = [name for name, flag in before["grads"].items() if after["grads"].get(name) != flag]
    assert not flipped and before["grads"].keys() == after["grads"].keys(), f"requires_grad changed: {flipped}"
    assert before["adapters"] == after["adapters"], "adapters or active adapters changed"


def _last_module(directory: Path) -> str:
    """The module whose weights come last in the file: a load that applies as it validates has changed every other
    module of the adapter by the time it reaches this one."""
    key = list(load_file(directory / "adapter_model.safetensors"))[-1]
    return key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]


def _fail_third_add_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation cannot foresee everything (device memory runs out, a layer raises): make the third layer fail while
    its adapter is created. Every layer, new or already a LoRA layer, gets its adapter through add_adapter."""
    add_adapter, calls = _LoRAAdapter.add_adapter, []

    def failing_add_adapter(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs["name"])
        if len(calls) == 3:
            raise RuntimeError("simulated failure while applying the adapter")
        return add_adapter(self, *args, **kwargs)

    monkeypatch.setattr(_LoRAAdapter, "add_adapter", failing_add_adapter)


def _broken_copy(good: Path, directory: Path, failure: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of adapter ``good`` that fails to load in the way ``failure`` names."""
    last = _last_module(good)
    if failure == "wrong_shape":  # lora_A of the last module one input feature short

        def weights(w: dict) -> dict:
            key = f"base_model.model.{last}.lora_A.weight"
            return {**w, key: w[key][:, :-1].contiguous()}

        return _copy_adapter(good, directory, weights=weights)
    if failure == "integer_weights":
        key = f"base_model.model.{last}.lora_B.weight"
        return _copy_adapter(good, directory, weights=lambda w: {**w, key: (w[key] * 100).to(torch.int32)})
    if failure == "unwrappable_module":  # weights for the final RMSNorm, which sorts after every layer
        hidden = 64

        def weights(w: dict) -> dict:
            r = next(v for k, v in w.items() if k.endswith("lora_A.weight")).shape[0]
            extra = {"base_model.model.model.norm.lora_A.weight": torch.zeros(r, hidden)}
            return {**w, **extra, "base_model.model.model.norm.lora_B.weight": torch.zeros(hidden, r)}

        return _copy_adapter(good, directory, weights=weights)
    if failure == "error_while_applying":
        _fail_third_add_adapter(monkeypatch)
        return good
    raise ValueError(failure)


FAILURES = ["wrong_shape", "integer_weights", "unwrappable_module", "error_while_applying"]
FAILURE_MESSAGES = {
    "wrong_shape": "lora_A (is )?\\(\\d, (63|95)\\)",
    "integer_weights": "floating point",
    "unwrappable_module": "'model.norm' is a LlamaRMSNorm",
    "error_while_applying": "simulated failure",
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_failed_load_leaves_a_bare_model_as_it_was(kind, failure, load_base, tokens, tmp_path, monkeypatch):
    """Whatever makes a load fail, the model keeps its modules, weights, requires_grad; the same name loads after."""
    _save_peft_adapter(load_base(kind), tmp_path / "good", seed=1, **QV)
    model = load_base(kind)
    for param in model.parameters():  # wrapping a layer freezes its base weight: make that a flag that can flip
        param.requires_grad_(param.is_floating_point())
    before = _state(model)
    with monkeypatch.context() as patch:
        broken = _broken_copy(tmp_path / "good", tmp_path / "broken", failure, patch)
        with pytest.raises((ValueError, TypeError, RuntimeError), match=FAILURE_MESSAGES[failure]):
            lora_engine.load_adapter(model, broken)
    _assert_same_state(before, _state(model))

    lora_engine.load_adapter(model, tmp_path / "good")  # the name "default" is free again
    ids = tokens(0)
    expected = _peft_logits(load_base(kind), ids, (tmp_path / "good", "default"), active="default")
    assert (expected - _logits(load_base(kind), ids)).abs().max() > MIN_ADAPTER_EFFECT, "the adapter does nothing"
    torch.testing.assert_close(_logits(model, ids), expected, rtol=RTOL, atol=ATOL)
    layer_type = LoRALinear4bit if kind == "4bit" else LoRALinear
    assert sorted(n for n, m in model.named_modules() if isinstance(m, layer_type)) == sorted(lora_layers(model))
    assert len(lora_layers(model)) == 4


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("kind", ["4bit", "dense"])
def test_failed_load_leaves_a_model_with_adapters_as_it_was(kind, failure, load_base, tokens, tmp_path, monkeypatch):
    """A second adapter that fails to load leaves the first active and trainable as it was, the layers it shares
    with the first without a trace of it, and the layers it would have added unwrapped."""
    _save_peft_adapter(load_base(kind), tmp_path / "first", seed=2, **QV)
    _save_peft_adapter(load_base(kind), tmp_path / "good", seed=3, **QV_DOWN)
    model = lora_engine.load_adapter(load_base(kind), tmp_path / "first", adapter_name="first", is_trainable=True)
    before = _state(model)
    assert any(before["grads"].values()), "the first adapter is trainable: a flag that can flip"
    with monkeypatch.context() as patch:
        broken = _broken_copy(tmp_path / "good", tmp_path / "broken", failure, patch)
        with pytest.raises((ValueError, TypeError, RuntimeError), match=FAILURE_MESSAGES[failure]):
            lora_engine.load_adapter(model, broken, adapter_name="second")
    _assert_same_state(before, _state(model))

    lora_engine.load_adapter(model, tmp_path / "good", adapter_name="second")
    ids = tokens(1)
    adapters_ = ((tmp_path / "first", "first"), (tmp_path / "good", "second"))
    for name in ("second", "first"):
        lora_engine.set_adapter(model, name)
        expected = _peft_logits(load_base(kind), ids, *adapters_, active=name)
        torch.testing.assert_close(_logits(model, ids), expected, rtol=RTOL, atol=ATOL)


def test_failed_inject_leaves_the_model_as_it_was(load_base, monkeypatch):
    """inject takes back the layers it already wrapped when a later one fails, on a bare model and on one with an
    adapter."""
    for existing in (None, ["q_proj"]):
        model = load_base("dense")
        if existing:
            lora_engine.inject(model, existing, r=2, adapter_name="first")
        before = _state(model)
        with monkeypatch.context() as patch:
            _fail_third_add_adapter(patch)
            with pytest.raises(RuntimeError, match="simulated failure"):
                lora_engine.inject(model, ["q_proj", "v_proj"], r=4, adapter_name="second")
        _assert_same_state(before, _state(model))
        lora_engine.inject(model, ["q_proj", "v_proj"], r=4, adapter_name="second")
        assert all(layer.active_adapter == "second" for layer in lora_layers(model).values())


def test_loading_another_adapter_keeps_what_requires_grad(load_base, tmp_path):
    """As PEFT's load_adapter: adding an adapter does not make the adapters already there trainable."""
    _save_peft_adapter(load_base("dense"), tmp_path / "first", seed=4, **QV)
    _save_peft_adapter(load_base("dense"), tmp_path / "second", seed=5, **QV_DOWN)
    model = lora_engine.load_adapter(load_base("dense"), tmp_path / "first", adapter_name="first")
    lora_engine.load_adapter(model, tmp_path / "second", adapter_name="second")
    peft_model = PeftModel.from_pretrained(load_base("dense"), tmp_path / "first", adapter_name="first")
    peft_model.load_adapter(tmp_path / "second", adapter_name="second")
    assert not any(p.requires_grad for p in peft_model.parameters()), "PEFT keeps an inference load frozen"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    assert model.model.layers[0].self_attn.q_proj.active_adapter == "first"


# ------------------------------------------------------------------------------------------------ config fields

# A value that changes what the adapter computes, for every field load_adapter refuses.
REFUSED_SAMPLES: dict[str, Any] = {
    "alora_invocation_tokens": [5, 6],
    "arrow_config": {"top_k": 2},
    "bias": "lora_only",
    "ensure_weight_tying": True,
    "init_lora_weights": "pissa",
    "kasa_config": {"beta": 1e-4},
    "layer_replication": [[0, 2], [1, 2]],
    "lora_bias": True,
    "modules_to_save": ["lm_head"],
    "monteclora_config": {"num_samples": 2},
    "target_parameters": ["mlp.experts.down_proj"],
    "trainable_token_indices": [1, 2],
    "use_bdlora": {"nblocks": 2},
    "use_dora": True,
    "use_qalora": True,
    "velora_config": {"num_groups": 4},
}
# A non-default value for every field load_adapter treats as harmless: loading with all of them at once must give
# PEFT's logits.
HARMLESS_SAMPLES: dict[str, Any] = {
    "auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"},
    "base_model_name_or_path": "someone/some-model",
    "corda_config": {"corda_method": "kpm"},
    "eva_config": {"rho": 1.5},
    "fan_in_fan_out": True,
    "inference_mode": False,
    "init_lora_weights": "orthogonal",
    "loftq_config": {"loftq_bits": 2},
    "lora_ga_config": {"direction": "ArBr"},
    "megatron_config": {"num_layers": 2},
    "megatron_core": "megatron.core.custom",
    "peft_version": "0.1.0",
    "qalora_group_size": 8,
    "revision": "v1",
    "runtime_config": {"ephemeral_gpu_offload": True},
    "task_type": "CAUSAL_LM",
}
# megatron_config makes PEFT import megatron.core, which is not installed: checked without PEFT.
PEFT_CANNOT_LOAD = {"megatron_config"}


def test_every_lora_config_field_is_classified():
    """Each field of the installed PEFT's LoraConfig (and its bases) is implemented, harmless or refused, so a field
    a newer PEFT adds cannot slip through as plain LoRA; the samples the tests use cover every class."""
    table = adapters._LORA_CONFIG_FIELDS
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert fields - set(table) == set(), "LoraConfig fields load_adapter does not classify"
    by_kind = {kind: {k for k, v in table.items() if v.handling == kind} for kind in ("implemented", "harmless")}
    refused = {k for k, v in table.items() if v.handling == "refused"}
    assert set(table) == by_kind["implemented"] | by_kind["harmless"] | refused
    assert set(REFUSED_SAMPLES) == refused
    # init_lora_weights is refused for some values and harmless for others: both samples exist
    assert set(HARMLESS_SAMPLES) == by_kind["harmless"] | {"init_lora_weights"}
    assert all(table[k].why for k in refused), "every refusal says why"
    for name, value in REFUSED_SAMPLES.items():
        assert value not in table[name].no_op, f"the {name} sample would load"
    defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING}
    for name in refused:
        if name in defaults:
            assert defaults[name] in table[name].no_op, f"PEFT's default {name}={defaults[name]!r} is refused"


@pytest.fixture(scope="module")
def plain_adapter(load_base, tmp_path_factory) -> Path:
    """A PEFT adapter on q_proj and v_proj of the dense tiny Llama."""
    directory = tmp_path_factory.mktemp("plain") / "adapter"
    _save_peft_adapter(load_base("dense"), directory, seed=6, **QV)
    return directory


@pytest.mark.parametrize("field", sorted(REFUSED_SAMPLES))
def test_refused_fields_name_themselves(field, plain_adapter, load_base, tmp_path):
    """A refused field raises before the model changes, naming the field, its value, why, and the PEFT route."""
    directory = _copy_adapter(
        plain_adapter, tmp_path / "adapter", config=lambda c: {**c, field: REFUSED_SAMPLES[field]}
    )
    model = load_base("dense")
    modules = dict(model.named_modules())
    why = adapters._LORA_CONFIG_FIELDS[field].why
    message = re.escape(f"{field}={REFUSED_SAMPLES[field]!r}") + ".*" + re.escape(why)
    with pytest.raises(NotImplementedError, match=f"{message}.*patch_peft_model"):
        lora_engine.load_adapter(model, directory)
    assert not lora_layers(model) and all(m is modules[n] for n, m in model.named_modules())


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(dict(alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"), id="aLoRA"),
        pytest.param(dict(use_qalora=True, qalora_group_size=8), id="QA-LoRA"),
        pytest.param(dict(init_lora_weights="pissa"), id="PiSSA"),
        pytest.param(dict(init_lora_weights="olora"), id="OLoRA"),
    ],
)
def test_adapters_that_compute_otherwise_are_refused(config, load_base, tmp_path):
    """Adapters stock PEFT saves with these settings are refused by name instead of running as plain LoRA."""
    _save_peft_adapter(load_base("dense"), tmp_path / "adapter", seed=7, **QV, **config)
    field = "alora_invocation_tokens" if "alora_invocation_tokens" in config else next(iter(config))
    with pytest.raises(NotImplementedError, match=f"{field}=.*is not supported.*patch_peft_model"):
        lora_engine.load_adapter(load_base("dense"), tmp_path / "adapter")
    if field == "init_lora_weights":  # why: loading such an adapter in PEFT rewrites the base weight
        base = load_base("dense")
        weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert not torch.equal(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)


def test_harmless_fields_load_like_peft(plain_adapter, load_base, tokens, tmp_path):
    """Metadata, initialisation settings the loaded weights overwrite, and settings PEFT ignores on these layers
    (fan_in_fan_out on nn.Linear) give PEFT's logits."""
    directory = _copy_adapter(plain_adapter, tmp_path / "adapter", config=lambda c: {**c, **HARMLESS_SAMPLES})
    ids = tokens(2)
    model = lora_engine.load_adapter(load_base("dense"), directory)
    ours = _logits(model, ids)

    for_peft = _copy_adapter(
        directory, tmp_path / "for_peft", config=lambda c: {k: v for k, v in c.items() if k not in PEFT_CANNOT_LOAD}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about runtime_config, fan_in_fan_out, unused sub-configs
        expected = _peft_logits(load_base("dense"), ids, (for_peft, "default"), active="default")
    assert (expected - _logits(load_base("dense"), ids)).abs().max() > MIN_ADAPTER_EFFECT
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=ATOL)


def test_unknown_config_keys_warn_and_load(plain_adapter, load_base, tokens, tmp_path):
    """As PEFT: keys LoraConfig does not have are named in a warning and ignored."""
    extra = {"future_option": 3, "another_one": None}
    directory = _copy_adapter(plain_adapter, tmp_path / "adapter", config=lambda c: {**c, **extra})
    with pytest.warns(UserWarning, match="another_one.*future_option"):
        model = lora_engine.load_adapter(load_base("dense"), directory)
    with pytest.warns(UserWarning, match="future_option"):
        peft_model = PeftModel.from_pretrained(load_base("dense"), directory)
    ids = tokens(3)
    torch.testing.assert_close(_logits(model, ids), _logits(peft_model.eval(), ids), rtol=RTOL, atol=ATOL)


def test_layer_selection_is_honoured(load_base, tokens, tmp_path):
    """target_modules, exclude_modules, layers_to_transform and layers_pattern select the layers as in PEFT; a
    config that selects other layers than the weights name is refused instead of loading what PEFT would not."""
    config = dict(
        QV, layers_to_transform=[1], layers_pattern="layers", exclude_modules=["model.layers.1.self_attn.v_proj"]
    )
    _save_peft_adapter(load_base("dense"), tmp_path / "layer1", seed=8, **config)
    model = lora_engine.load_adapter(load_base("dense"), tmp_path / "layer1")
    assert sorted(lora_layers(model)) == ["model.layers.1.self_attn.q_proj"]
    ids = tokens(4)
    expected = _peft_logits(load_base("dense"), ids, (tmp_path / "layer1", "default"), active="default")
    torch.testing.assert_close(_logits(model, ids), expected, rtol=RTOL, atol=ATOL)

    # the config selects layer 0, the weights are layer 1's: PEFT would wrap layer 0 and drop the weights
    other_layer = _copy_adapter(
        tmp_path / "layer1", tmp_path / "layer0", config=lambda c: {**c, "layers_to_transform": [0]}
    )
    with pytest.raises(
        ValueError, match=r"weights for modules its config does not select.*layers\.1\.self_attn\.q_proj"
    ):
        lora_engine.load_adapter(load_base("dense"), other_layer)
    # the weights name a module the config excludes
    excluded = _copy_adapter(
        tmp_path / "layer1", tmp_path / "excluded", config=lambda c: {**c, "exclude_modules": ["q_proj"]}
    )
    with pytest.raises(ValueError, match=r"does not select.*exclude_modules"):
        lora_engine.load_adapter(load_base("dense"), excluded)
    # without the layer restriction the config selects both layers' q_proj and v_proj, but only one has weights
    unrestricted = _copy_adapter(
        tmp_path / "layer1",
        tmp_path / "all_layers",
        config=lambda c: {**c, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None},
    )
    with pytest.raises(ValueError, match=r"selects modules the weights file has no LoRA weights for.*layers\.0"):
        lora_engine.load_adapter(load_base("dense"), unrestricted)

"""inject / save_adapter / load_adapter / set_adapter / print_trainable_parameters against stock PEFT.

Every equivalence runs a tiny Llama, in 4 bits (loaded with a BitsAndBytesConfig, the path users take) and
dense, through the Triton kernels (CPU interpreter) and through the torch reference. lora_B is randomized so
that each adapter moves the logits far more than the tolerance (checked), so a missing layer, a wrong scaling
or a swapped key fails.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lora_engine
from lora_engine import LoRALinear, LoRALinear4bit
from lora_engine.integrations.adapters import lora_layers

# Both sides compute in fp32 from bit-identical dequantized weights; only the summation order differs
# (the kernels' K tiles vs. one matmul), about K * eps ~ 64 * 1.2e-7 relative per layer over a few layers.
# 1e-4 leaves room for that and is ~1000x below what one adapter changes (asserted by _assert_adapter_moves).
ATOL = RTOL = 1e-4
MIN_ADAPTER_EFFECT = 100 * ATOL

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]
BASES = ["4bit", "dense"]


def _backend(name: str):
    """The kernels run under TRITON_INTERPRET=1 on CPU ("auto" picks them); "torch" forces the reference."""
    return lora_engine.use_backend("torch") if name == "torch" else contextlib.nullcontext()


@pytest.fixture(scope="module")
def load_base(tiny_llama_dir, load_4bit):
    """``load_base(kind)``: a fresh tiny Llama, 4-bit or dense fp32, in eval mode (no dropout)."""
    from transformers import AutoModelForCausalLM

    def load(kind: str) -> nn.Module:
        if kind == "4bit":
            return load_4bit().eval()
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    return load


def _randomize_lora_B(model: nn.Module, seed: int, std: float = 0.05) -> None:
    """Fresh lora_B is zero (the adapter does nothing); give it values as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _assert_adapter_moves(with_adapter: torch.Tensor, base: torch.Tensor) -> None:
    effect = (with_adapter - base).abs().max().item()
    assert effect > MIN_ADAPTER_EFFECT, f"the adapter changes logits by only {effect:.3g}: the test could not fail"


def _peft_adapter(load_base, kind: str, directory: Path, seed: int, **config) -> torch.nn.Module:
    """Save a PEFT adapter (randomized B) for a fresh base to ``directory``; returns the PeftModel."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(kind), LoraConfig(**config))
    _randomize_lora_B(model, seed)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BASES)
def test_saved_adapter_loads_in_stock_peft(kind, backend, load_base, tokens, tmp_path):
    model = lora_engine.inject(load_base(kind), "all-linear", r=4, lora_alpha=8, lora_dropout=0.05)
    _randomize_lora_B(model, seed=1)
    model.eval()
    ids = tokens(0)
    with _backend(backend):
        ours = _logits(model, ids)
    lora_engine.save_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(load_base(kind), tmp_path).eval()
    theirs = _logits(peft_model, ids)
    _assert_adapter_moves(theirs, _logits(load_base(kind), ids))
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    # PEFT built exactly our layers from the config (all-linear leaves lm_head alone, as PEFT's does)
    assert sorted(peft_model.base_model.targeted_module_names) == sorted(lora_layers(model))
    assert peft_model.peft_config["default"].lora_dropout == 0.05


def test_saved_keys_and_config_are_peft_s(load_base, tmp_path):
    """Our file has exactly the keys, shapes and dtypes PEFT writes for the same adapter."""
    model = lora_engine.inject(load_base("4bit"), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    lora_engine.save_adapter(model, tmp_path / "ours")
    _peft_adapter(load_base, "4bit", tmp_path / "peft", seed=0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    ours, theirs = (
        load_file(tmp_path / "ours/adapter_model.safetensors"),
        load_file(tmp_path / "peft/adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours
    config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4 and config["lora_alpha"] == 8
    assert (
        config["base_model_name_or_path"]
        == json.loads((tmp_path / "peft/adapter_config.json").read_text())["base_model_name_or_path"]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BASES)
def test_peft_adapter_loads_and_round_trips(kind, backend, load_base, tokens, tmp_path):
    """A PEFT adapter with rsLoRA and per-layer rank/alpha patterns loads into a bare model (injected per the
    adapter), gives PEFT's logits, and saved again loads into PEFT with the same logits."""
    config = dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3},
    )  # fmt: skip
    peft_model = _peft_adapter(load_base, kind, tmp_path / "peft", seed=2, **config)
    ids = tokens(1)
    expected = _logits(peft_model, ids)
    _assert_adapter_moves(expected, _logits(load_base(kind), ids))

    model = lora_engine.load_adapter(load_base(kind), tmp_path / "peft")
    layers = lora_layers(model)
    assert sorted(layers) == sorted(peft_model.base_model.targeted_module_names)
    assert layers["model.layers.0.mlp.down_proj"].r == 2
    assert layers["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(3 / 2)  # rsLoRA: alpha / sqrt(r)
    assert isinstance(layers["model.layers.0.self_attn.q_proj"], LoRALinear4bit if kind == "4bit" else LoRALinear)
    assert not any(p.requires_grad for p in model.parameters()), "loaded for inference, as PEFT's default"
    with _backend(backend):
        torch.testing.assert_close(_logits(model, ids), expected, rtol=RTOL, atol=ATOL)

    lora_engine.save_adapter(model, tmp_path / "ours")
    again = PeftModel.from_pretrained(load_base(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again, ids), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_adapters_switch_like_peft(backend, load_base, tokens, tmp_path):
    """Two PEFT adapters with different targets on one 4-bit base: each one, when active, gives what PEFT gives
    with the same adapter active; switching reloads nothing."""
    _peft_adapter(load_base, "4bit", tmp_path / "qv", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _peft_adapter(load_base, "4bit", tmp_path / "all", seed=4, r=2, lora_alpha=4, target_modules="all-linear")
    peft_model = PeftModel.from_pretrained(load_base("4bit"), tmp_path / "qv", adapter_name="qv")
    peft_model.load_adapter(tmp_path / "all", adapter_name="all")
    peft_model.eval()

    model = lora_engine.load_adapter(load_base("4bit"), tmp_path / "qv", adapter_name="qv")
    q_proj = model.model.layers[0].self_attn.q_proj
    base_weight, base_ptr = q_proj.weight, q_proj.weight.data_ptr()
    lora_engine.load_adapter(model, tmp_path / "all", adapter_name="all")
    assert q_proj.active_adapter == "qv" and model.model.layers[0].mlp.up_proj.active_adapter is None
    ids = tokens(2)
    with _backend(backend):
        outputs = {}
        for name in ("qv", "all", "qv"):
            lora_engine.set_adapter(model, name)
            peft_model.set_adapter(name)
            outputs.setdefault(name, []).append(_logits(model, ids))
            torch.testing.assert_close(outputs[name][-1], _logits(peft_model, ids), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(outputs["qv"][0], outputs["qv"][1], rtol=0, atol=0)
    _assert_adapter_moves(outputs["qv"][0], outputs["all"][0])
    assert q_proj.weight is base_weight and q_proj.weight.data_ptr() == base_ptr, "the base weight was not reloaded"


def test_inject_trains_only_the_active_adapter(load_base, tokens):
    model = lora_engine.inject(load_base("4bit"), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{m}_proj.lora_{ab}" for i in (0, 1) for m in "qv" for ab in "AB"}
    assert isinstance(model.model.layers[0].self_attn.k_proj, torch.nn.Linear), "k_proj was not targeted"
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _randomize_lora_B(model, seed=5)
    ids = tokens(3)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed == trainable, "exactly the LoRA weights moved"

    lora_engine.inject(model, ["k_proj"], r=2, adapter_name="second")
    k_proj, q_proj = model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.q_proj
    assert q_proj.active_adapter is None and q_proj.lora_A is None, "q_proj has no 'second' adapter: base alone"
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.k_proj.lora_{ab}" for i in (0, 1) for ab in "AB"
    }
    assert set(k_proj.state_dict()) >= {"lora_A", "lora_B"} and k_proj.lora_A.shape == (2, 64)


def test_print_trainable_parameters_agrees_with_peft(load_base, tmp_path, capsys):
    """PEFT counts a 4-bit weight as its packed numel x 2 and counts inactive adapters in the total."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = _peft_adapter(load_base, "4bit", tmp_path / "a", seed=6, **config)
    ours = lora_engine.inject(load_base("4bit"), **config)
    capsys.readouterr()
    count = lora_engine.print_trainable_parameters(ours)
    printed = capsys.readouterr().out
    peft_model.print_trainable_parameters()
    assert printed == capsys.readouterr().out
    assert tuple(count) == peft_model.get_nb_trainable_parameters()
    assert count.trainable == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)  # two layers of q (64->64) and v (64->32)
    dense_total = sum(p.numel() for p in load_base("dense").parameters())
    assert count.total == dense_total + count.trainable, "a 4-bit weight counts as its logical [out, in] size"
    assert lora_engine.print_trainable_parameters(peft_model) == count, "any model, PEFT's included"

    # a second, inactive adapter counts in the total and not as trainable, in both
    _peft_adapter(load_base, "4bit", tmp_path / "b", seed=7, r=2, lora_alpha=2, target_modules="all-linear")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    lora_engine.load_adapter(ours, tmp_path / "b", adapter_name="b")
    assert tuple(lora_engine.print_trainable_parameters(ours)) == peft_model.get_nb_trainable_parameters()


def test_all_linear_skips_a_classification_head():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=50, num_labels=3
    )
    model = lora_engine.inject(BertForSequenceClassification(config), "all-linear", r=2)
    assert type(model.classifier) is nn.Linear and not model.classifier.weight.requires_grad
    assert sorted(lora_layers(model)) == sorted(
        name
        for name, m in BertForSequenceClassification(config).named_modules()
        if type(m) is nn.Linear
        if name != "classifier"
    )


def test_errors_name_the_problem(load_base, tmp_path):
    model = load_base("dense")
    with pytest.raises(ValueError, match="no module of the model matched target_modules=\\['q_projection'\\]"):
        lora_engine.inject(model, ["q_projection"])
    with pytest.raises(TypeError, match="'model.embed_tokens' is a Embedding"):
        lora_engine.inject(model, ["embed_tokens"])
    with pytest.raises(ValueError, match="no lora_engine LoRA layers"):
        lora_engine.set_adapter(model, "default")
    lora_engine.inject(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lora_engine.inject(model, ["v_proj"], r=2)
    with pytest.raises(ValueError, match="unknown adapter 'other'; the model has adapters \\['default'\\]"):
        lora_engine.set_adapter(model, "other")
    with pytest.raises(ValueError, match="unknown adapter 'other'"):
        lora_engine.save_adapter(model, tmp_path / "x", adapter_name="other")
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        lora_engine.load_adapter(model, tmp_path / "missing", adapter_name="b")

    _peft_adapter(load_base, "dense", tmp_path / "dora", seed=0, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(NotImplementedError, match="use_dora=True is not supported"):
        lora_engine.load_adapter(model, tmp_path / "dora", adapter_name="b")

    lora_engine.save_adapter(model, tmp_path / "ok")
    weights = load_file(tmp_path / "ok/adapter_model.safetensors")
    from safetensors.torch import save_file

    renamed = {k.replace("layers.1", "layers.7"): v for k, v in weights.items()}
    save_file(renamed, tmp_path / "ok/adapter_model.safetensors")
    with pytest.raises(ValueError, match="weights for module 'model.layers.7.self_attn.q_proj', which the model"):
        lora_engine.load_adapter(load_base("dense"), tmp_path / "ok")
    config = json.loads((tmp_path / "ok/adapter_config.json").read_text())
    (tmp_path / "ok/adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    save_file(weights, tmp_path / "ok/adapter_model.safetensors")
    with pytest.raises(ValueError, match="its rank per the config is 3"):
        lora_engine.load_adapter(load_base("dense"), tmp_path / "ok")


def test_merge_and_unload_keeps_the_outputs(load_base, tokens):
    model = lora_engine.inject(load_base("4bit"), "all-linear", r=4, lora_alpha=8)
    _randomize_lora_B(model, seed=8)
    ids = tokens(4)
    with lora_engine.use_backend("torch"):
        expected = _logits(model, ids)
    merged = lora_engine.merge_and_unload(model)
    assert not lora_layers(merged) and type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=RTOL, atol=ATOL)

"""The benchmark's LoRA providers all compute the same layer (the base-only ones that layer without its LoRA term),
so their timings compare like with like."""

import pytest
import torch

from bench.providers import (
    ALL_PROVIDERS,
    BASE_PROVIDERS,
    KIND_PROVIDERS,
    MODES,
    OTHER_FORMATS,
    ProviderUnavailable,
    build,
    installed,
    make_inputs,
)
from bench.shapes import MODELS, layer_shapes

pytestmark = pytest.mark.interpreter


def _same_layer_providers():
    """Every provider of our format and of the LoRA layer (those of another format, such as GemLite, compute another
    function; the adapter kinds are checked against their own references in test_kind_providers.py)."""
    return [p for p in ALL_PROVIDERS if p not in OTHER_FORMATS and p not in KIND_PROVIDERS]


def test_every_provider_computes_the_same_layer():
    inputs = make_inputs(40, 128, 5, dtype=torch.float32, device="cpu")  # K a multiple of the blocksize: gemv too
    reference = build("torch_reference", inputs, "fwdbwd")
    reference.fn()
    expected = [leaf.grad for leaf in reference.grad_leaves]
    y_expected = build("torch_reference", inputs, "fwd").fn()
    for provider in _same_layer_providers():
        y = build(provider, inputs, "fwd").fn()
        if provider == "dense_bf16" or provider in BASE_PROVIDERS:  # no LoRA term: short of the LoRA product
            lora = inputs.scaling * (inputs.x @ inputs.lora_A.t()) @ inputs.lora_B.t()
            torch.testing.assert_close(y + lora, y_expected, rtol=1e-5, atol=1e-5, msg=f"{provider} forward")
            if provider in BASE_PROVIDERS:  # dx = dy·W, the gradient of the layer without its LoRA term
                run = build(provider, inputs, "fwdbwd")
                run.fn()
                base_dx = inputs.dy @ inputs.dense
                torch.testing.assert_close(run.grad_leaves[0].grad, base_dx, rtol=1e-4, atol=1e-5, msg=provider)
            continue
        torch.testing.assert_close(y, y_expected, rtol=1e-5, atol=1e-5, msg=f"{provider} forward")
        run = build(provider, inputs, "fwdbwd")
        run.fn()
        for name, leaf, want in zip(("dx", "dA", "dB"), run.grad_leaves, expected):
            torch.testing.assert_close(leaf.grad, want, rtol=1e-4, atol=1e-5, msg=f"{provider} {name}")


def test_unknown_provider_and_mode_are_named():
    inputs = make_inputs(8, 64, 1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="unknown provider 'cublas'"):
        build("cublas", inputs, "fwd")
    with pytest.raises(ValueError, match="unknown mode 'train'"):
        build("bnb_peft", inputs, "train")
    assert set(MODES) == {"fwd", "fwdbwd", "decode"}


def test_shape_registry_holds_real_projections():
    llama = MODELS["llama3-8b"].projections()
    assert llama["q_proj"] == (4096, 4096) and llama["gate_proj"] == (14336, 4096)
    assert llama["down_proj"] == (4096, 14336)
    assert llama["k_proj"] == (1024, 4096)
    shapes = layer_shapes(["llama3-8b", "mistral-7b"])
    assert len({(n, k) for _, _, n, k in shapes}) == len(shapes), "repeated (N, K) pairs are measured once"
    with pytest.raises(ValueError, match="unknown model"):
        layer_shapes(["gpt-5"])


def test_a_provider_whose_package_is_missing_is_named():
    inputs = make_inputs(8, 64, 1, dtype=torch.float32, device="cpu")
    for provider in OTHER_FORMATS:
        if installed(provider):
            continue
        with pytest.raises(ProviderUnavailable, match=f"provider {provider!r} needs the"):
            build(provider, inputs, "decode")

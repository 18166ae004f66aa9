"""The adapter-kind providers of the benchmark compute their kind's reference (lora_engine.reference) on the case's
operands, forward and every gradient they produce; the mixed-batch ones agree row by row, each row with its own
adapter; and a kind asked for a mode it does not run builds nothing."""

from collections import Counter

import pytest
import torch

import lora_engine
from bench.providers import (
    KIND_MODES,
    KIND_PROVIDERS,
    MODES,
    MULTI_RANKS,
    build,
    dora_magnitude,
    ia3_scale,
    make_inputs,
    multi_adapter_indices,
    multi_adapters,
)
from lora_engine import reference

pytestmark = pytest.mark.interpreter

N, K, M = 40, 128, 11  # M not a multiple of 8: three adapters get two rows, five get one
RTOL, ATOL = 1e-4, 1e-5  # fp32; a dropped or misplaced adapter term is off by more than 1e-2 (checked below)
MIN_EFFECT = 1e-2  # every kind moves the output at least this much away from the layer without it


def _inputs():
    return make_inputs(N, K, M, dtype=torch.float32, device="cpu")


def _run(provider: str, inputs, mode: str):
    """Build and call once; our kernels forced (the reference instead would raise, not pass unnoticed)."""
    run = build(provider, inputs, mode)
    assert run is not None, f"{provider} does not build in {mode}"
    with lora_engine.use_backend("triton"):
        return run, run.fn()


def _reference(provider: str, t, leaves: list[torch.Tensor]) -> torch.Tensor:
    """The kind's reference on ``leaves`` (x first, then the trainables in the provider's order)."""
    state = t.weight.quant_state
    if provider.endswith("dora_dense"):
        x, lora_A, lora_B, magnitude = leaves
        return reference.dora_linear(x, t.dense, lora_A, lora_B, magnitude, t.scaling)
    if "dora" in provider:
        x, lora_A, lora_B, magnitude = leaves
        return reference.dora_linear_4bit(x, t.weight, state, lora_A, lora_B, magnitude, t.scaling)
    x, scale = leaves
    return reference.ia3_linear_4bit(x, t.weight, state, scale, provider.endswith("_ff"))


def _kind_leaves(provider: str, t) -> list[torch.Tensor]:
    if "dora" in provider:
        tensors = [t.x, t.lora_A, t.lora_B, dora_magnitude(t)]
    else:
        tensors = [t.x, ia3_scale(t, provider.endswith("_ff"))]
    return [v.detach().clone().requires_grad_() for v in tensors]


@pytest.mark.parametrize("provider", [p for p in KIND_PROVIDERS if "multi" not in p])
def test_dora_and_ia3_providers_compute_their_reference_forward_and_gradients(provider):
    t = _inputs()
    leaves = _kind_leaves(provider, t)
    y_ref = _reference(provider, t, leaves)
    y_ref.backward(t.dy)
    without = reference.linear_4bit(t.x, t.weight, t.weight.quant_state)
    if "dora" in provider:
        without = reference.lora_linear_4bit(t.x, t.weight, t.weight.quant_state, t.lora_A, t.lora_B, t.scaling)
    assert (y_ref - without).abs().max() > MIN_EFFECT, "the kind's operands leave the layer as it was"

    _, y = _run(provider, t, "fwd")
    torch.testing.assert_close(y.float(), y_ref.detach(), rtol=RTOL, atol=ATOL, msg=f"{provider} forward")
    run, _ = _run(provider, t, "fwdbwd")
    names = ("dx", "dA", "dB", "dm") if "dora" in provider else ("dx", "dl")
    assert len(run.grad_leaves) == len(names), f"{provider}: leaves {[tuple(v.shape) for v in run.grad_leaves]}"
    for name, leaf, want in zip(names, run.grad_leaves, leaves):
        assert leaf.grad is not None, f"{provider}: no {name}"
        got = leaf.grad.reshape(want.shape)  # PEFT keeps IA3's vector as (1, K) or (N, 1)
        torch.testing.assert_close(got, want.grad, rtol=RTOL, atol=ATOL, msg=f"{provider} {name}")


def test_the_mixed_batch_spreads_the_rows_evenly_over_eight_adapters_of_different_ranks():
    counts = Counter(multi_adapter_indices(M))
    assert sorted(counts) == list(range(8)) and set(counts.values()) == {1, 2}, counts
    assert multi_adapter_indices(16) == [0, 1, 2, 3, 4, 5, 6, 7] * 2, "the rows of one adapter are interleaved"
    adapters = multi_adapters(_inputs())
    assert [a.shape[0] for a, _, _ in adapters] == list(MULTI_RANKS)
    assert [s for _, _, s in adapters] == [32 / r for r in MULTI_RANKS]


@pytest.mark.parametrize("mode", ["fwd", "decode"])
def test_the_multi_providers_agree_row_by_row_each_row_with_its_own_adapter(mode):
    t = _inputs()
    state = t.weight.quant_state
    adapters = multi_adapters(t)
    indices = multi_adapter_indices(M)
    _, ours = _run("lora_engine_multi8", t, mode)
    _, peft = _run("peft_multi8", t, mode)
    y_ref = reference.multi_lora_linear_4bit(
        t.x, t.weight, state, [a for a, _, _ in adapters], [b for _, b, _ in adapters], [s for _, _, s in adapters],
        torch.tensor(indices),
    )  # fmt: skip
    torch.testing.assert_close(ours, y_ref, rtol=RTOL, atol=ATOL, msg="lora_engine_multi8 against the reference")
    base = reference.linear_4bit(t.x, t.weight, state)
    for row, i in enumerate(indices):
        lora_A, lora_B, scaling = adapters[i]
        want = reference.lora_linear_4bit(t.x[row : row + 1], t.weight, state, lora_A, lora_B, scaling)[0]
        assert (want - base[row]).abs().max() > MIN_EFFECT, f"row {row}: adapter {i} adds nothing"
        other = adapters[(i + 1) % len(adapters)]
        assert (reference.lora_linear_4bit(t.x[row : row + 1], t.weight, state, *other)[0] - want).abs().max() > (
            MIN_EFFECT
        ), f"row {row}: the next adapter gives the same row"
        torch.testing.assert_close(ours[row], peft[row], rtol=RTOL, atol=ATOL, msg=f"row {row}: ours vs PEFT's")
        torch.testing.assert_close(ours[row], want, rtol=RTOL, atol=ATOL, msg=f"row {row}: adapter {i}")


def test_a_kind_asked_for_a_mode_it_does_not_run_builds_nothing():
    t = make_inputs(8, 64, 3, dtype=torch.float32, device="cpu")
    assert set(KIND_MODES) == {"lora_engine_multi8", "peft_multi8", "lora_engine_dora", "peft_dora",
                               "lora_engine_dora_dense", "peft_dora_dense"}  # fmt: skip
    for provider in KIND_PROVIDERS:
        for mode in MODES:
            run = build(provider, t, mode)
            runs = mode in KIND_MODES.get(provider, MODES)
            assert (run is not None) == runs, f"{provider} {mode}: built {run!r}"
    assert build("lora_engine_multi8", t, "fwdbwd") is None and build("peft_dora", t, "decode") is None

"""pytest-benchmark view of the layer benchmark: ``pytest bench/ --benchmark-enable`` on a CUDA GPU.

Each case times one provider on shared inputs (``bench/providers.py``); compare rows of one shape and mode.
Cases a provider does not apply to (``lora_engine[gemv]`` above ``GEMV_MAX_TOKENS``) are skipped with the reason.
``python -m bench`` covers more shapes and M and writes the results tables.
"""

import pytest
import torch

from bench.providers import DEFAULT_PROVIDERS, LayerInputs, Runnable, build, make_inputs
from bench.shapes import ANCHOR_PROJECTIONS, MODELS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="layer benchmarks need a CUDA GPU")

SHAPES = {proj: MODELS["llama3-8b"].projections()[proj] for proj in ANCHOR_PROJECTIONS}
REGIMES = [("fwdbwd", 8192), ("fwd", 8192), ("fwd", 256), ("decode", 1), ("decode", 16)]


def build_or_skip(provider: str, inputs: LayerInputs, mode: str) -> Runnable:
    """The runnable for ``provider`` in ``mode``; skips the test where the provider does not apply to the case."""
    run = build(provider, inputs, mode)
    if run is None:
        pytest.skip(f"{provider} does not apply to {mode} at M = {inputs.m}")
    return run


@pytest.fixture(scope="module")
def inputs_cache():
    return {}


@pytest.mark.parametrize("provider", DEFAULT_PROVIDERS)
@pytest.mark.parametrize("mode,m", REGIMES, ids=[f"{mode}-M{m}" for mode, m in REGIMES])
@pytest.mark.parametrize("proj", SHAPES)
def test_layer(benchmark, inputs_cache, proj, mode, m, provider):
    n, k = SHAPES[proj]
    if (n, k, m) not in inputs_cache:
        inputs_cache.clear()  # one shape's operands at a time
        inputs_cache[(n, k, m)] = make_inputs(n, k, m)
    run = build_or_skip(provider, inputs_cache[(n, k, m)], mode)
    run.fn()

    def reset_grads():
        for leaf in run.grad_leaves:
            leaf.grad = None

    def call():
        run.fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(N=n, K=k, M=m, mode=mode, provider=provider)
    benchmark.pedantic(call, setup=reset_grads, rounds=30, warmup_rounds=3)

"""pytest-benchmark view of the layer benchmark: ``pytest bench/ --benchmark-enable`` on a CUDA GPU.

Each case times one provider on shared inputs (``bench/providers.py``); compare rows of one shape and mode.
``python -m bench`` covers more shapes and M and writes the results tables.
"""

import pytest
import torch

from bench.providers import DEFAULT_PROVIDERS, build, make_inputs
from bench.shapes import ANCHOR_PROJECTIONS, MODELS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="layer benchmarks need a CUDA GPU")

SHAPES = {proj: MODELS["llama3-8b"].projections()[proj] for proj in ANCHOR_PROJECTIONS}
REGIMES = [("fwdbwd", 8192), ("fwd", 8192), ("fwd", 256), ("decode", 1), ("decode", 16)]


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
    run = build(provider, inputs_cache[(n, k, m)], mode)
    run.fn()

    def reset_grads():
        for leaf in run.grad_leaves:
            leaf.grad = None

    def call():
        run.fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(N=n, K=k, M=m, mode=mode, provider=provider)
    benchmark.pedantic(call, setup=reset_grads, rounds=30, warmup_rounds=3)

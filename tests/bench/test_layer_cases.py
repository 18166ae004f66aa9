"""Every case of the pytest-benchmark file (``bench/test_layer.py``, CUDA only) builds its provider or skips
with the reason; checked here on CPU, where building a provider runs no kernel."""

import pytest
import torch
from lora_engine.kernels.configs import GEMV_MAX_TOKENS

from bench.providers import DEFAULT_PROVIDERS, Runnable, make_inputs
from bench.test_layer import REGIMES, build_or_skip


def test_gemv_provider_is_skipped_above_its_token_limit():
    inputs = make_inputs(40, 128, GEMV_MAX_TOKENS + 1, dtype=torch.float32, device="cpu")
    reason = rf"lora_engine\[gemv\] does not apply to fwd at M = {GEMV_MAX_TOKENS + 1}"
    with pytest.raises(pytest.skip.Exception, match=reason):
        build_or_skip("lora_engine[gemv]", inputs, "fwd")


@pytest.mark.parametrize("mode,m", REGIMES, ids=[f"{mode}-M{m}" for mode, m in REGIMES])
def test_every_benchmark_case_builds_or_skips(mode, m):
    inputs = make_inputs(40, 128, m, dtype=torch.float32, device="cpu")
    skipped = set()
    for provider in DEFAULT_PROVIDERS:
        try:
            run = build_or_skip(provider, inputs, mode)
        except pytest.skip.Exception:
            skipped.add(provider)
            continue
        assert isinstance(run, Runnable), f"{provider} {mode} M={m}: built {run!r}"
    assert skipped == ({"lora_engine[gemv]"} if m > GEMV_MAX_TOKENS else set())

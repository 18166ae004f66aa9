"""``python -m bench.tune``'s GEMV sweep (timed on a GPU only): which configs it would time, checked on CPU."""

import dataclasses

import pytest
from lora_engine.kernels.configs import GEMV_LOOKUPS, gemv_config
from lora_engine.kernels.lora_gemv import gemv_k_split

from bench.tune import GEMV_SPLIT_K, gemv_candidates


@pytest.mark.parametrize("m, k", [(1, 4096), (16, 4096), (4, 14336)])
def test_gemv_sweep_covers_every_variant_once(m, k):
    configs = list(gemv_candidates(m, 16, k, 64))
    assert configs[0] == gemv_config(m, 16), "the dispatcher's default comes first, to compare against"
    runs_as = [dataclasses.replace(c, split_k=gemv_k_split(k, 64, c)[1]) for c in configs]
    assert len(set(runs_as)) == len(configs), "two configs run the same kernels"
    assert len(configs) <= 1 + 9 * len(GEMV_LOOKUPS) * len(GEMV_SPLIT_K)  # the default may lie outside the grid
    for lookup in GEMV_LOOKUPS:
        splits = {gemv_k_split(k, 64, c)[1] for c in configs if c.lookup == lookup}
        assert set(GEMV_SPLIT_K) - {32} <= splits, f"{lookup}: splits {sorted(splits)}"
    for c in configs:
        assert c.m_pad * c.block_n * c.block_k <= 16384 or c == configs[0]


def test_gemv_sweep_leaves_out_splits_k_cannot_hold():
    # K = 512 is four 128-wide steps: split_k 8 and above would run as 4 parts, already listed
    configs = list(gemv_candidates(1, 16, 512, 64))
    assert max(gemv_k_split(512, 64, c)[1] for c in configs) == 4
    assert all(c.split_k <= 4 for c in configs)

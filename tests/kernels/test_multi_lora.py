"""The mixed-batch kernels against torch: shrink (``x[m]·A_iᵀ``) and expand (``y[m] += s_i·left·B_iᵀ``) with the rows
grouped by adapter, three adapters of ranks 4, 8 and 16, rows of no adapter, rows in shuffled adapter order.

Three-way rule (``lora_engine.testing.assert_close_3way``): the kernel may err at most twice as much as torch in the
same dtype, against float64.
"""

import zlib

import pytest
import torch

from lora_engine.kernels.configs import multi_lora_config
from lora_engine.testing import assert_bitwise_equal, assert_close_3way

pytestmark = pytest.mark.interpreter

RANKS = (4, 8, 16)
SCALINGS = (2.0, 0.5, 1.25)
F16, F32 = torch.float16, torch.float32


def _case(m: int, n: int, k: int, dtype: torch.dtype, device: str, name: str) -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    indices = torch.randint(-1, len(RANKS), (m,), generator=gen)
    if m >= len(RANKS) + 1:  # every adapter and the base present, in shuffled order
        indices[: len(RANKS) + 1] = torch.arange(-1, len(RANKS))
        indices = indices[torch.randperm(m, generator=gen)]
    else:  # a single row: the adapter of the largest rank
        indices[:] = len(RANKS) - 1
    r_max = max(RANKS)
    stacked_A = torch.zeros(len(RANKS), r_max, k)
    stacked_B = torch.zeros(len(RANKS), n, r_max)
    for i, r in enumerate(RANKS):
        stacked_A[i, :r] = torch.randn(r, k, generator=gen) * 0.3
        stacked_B[i, :, :r] = torch.randn(n, r, generator=gen) * 0.3
    return dict(
        x=torch.randn(m, k, generator=gen).to(device, dtype),
        y=torch.randn(m, n, generator=gen).to(device, dtype),
        A=stacked_A.to(device, dtype),
        B=stacked_B.to(device, dtype),
        s=torch.tensor(SCALINGS, device=device),
        indices=indices.to(device),
    )


def _torch_shrink(x, A, indices, dtype):
    left = torch.zeros(x.shape[0], A.shape[1], dtype=dtype, device=x.device)
    for m, i in enumerate(indices.tolist()):
        if i >= 0:
            left[m] = x[m].to(dtype) @ A[i].to(dtype).t()
    return left


CASES = [(1, F32), (7, F16), (33, F32), (33, F16)]


@pytest.mark.parametrize("m,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_shrink_and_expand_match_torch(m, dtype, kernel_device):
    from lora_engine.kernels.lora_multi import multi_lora_expand, multi_lora_shrink, segment_metadata

    n, k = 37, 75  # multiples of no tile
    t = _case(m, n, k, dtype, kernel_device, f"{m}-{dtype}")
    segments = segment_metadata(t["indices"], len(RANKS), multi_lora_config(m).block_m)
    left = multi_lora_shrink(t["x"], t["A"], segments)
    # the kernel writes left in sorted order: put it back in row order to compare
    unsorted = torch.empty_like(left)
    unsorted[segments.rows] = left
    precise, same = (_torch_shrink(t["x"], t["A"], t["indices"], d) for d in (torch.float64, dtype))
    assert precise.abs().max() > 0, "degenerate case"
    assert_close_3way(f"M{m} shrink", unsorted.to(dtype), precise, same)

    # expand from the same left factor (rounded to the activations' dtype, as the kernel reads it)
    y = t["y"].clone()
    multi_lora_expand(y, left, t["B"], t["s"], segments)
    expected = {}
    for label, d in (("precise", torch.float64), ("same", dtype)):
        ref = t["y"].to(d).clone()
        for row, i in enumerate(t["indices"].tolist()):
            if i >= 0:
                ref[row] = ref[row] + SCALINGS[i] * (unsorted[row].to(dtype).to(d) @ t["B"][i].to(d).t())
        expected[label] = ref
    assert_close_3way(f"M{m} expand", y, expected["precise"], expected["same"])
    base_rows = t["indices"] < 0
    assert_bitwise_equal(f"M{m} rows of no adapter", y[base_rows], t["y"][base_rows])


def test_segment_metadata_covers_each_row_once(kernel_device):
    from lora_engine.kernels.lora_multi import segment_metadata

    indices = torch.tensor([2, -1, 0, 2, 2, 0, -1, 2, 2, 2, 2, 2], device=kernel_device)
    block_m = 4
    seg = segment_metadata(indices, 4, block_m)  # adapter 1 and 3 have no rows
    assert seg.block_adapter.shape[0] == 3 + 4  # cdiv(12, 4) + adapters: a bound, no host sync
    covered = []
    for a, start, end in zip(seg.block_adapter.tolist(), seg.block_start.tolist(), seg.block_end.tolist()):
        if a < 0:
            continue
        positions = range(start, min(start + block_m, end))
        rows = seg.rows[list(positions)].tolist()
        assert all(indices[r].item() == a for r in rows), (a, rows)
        covered += rows
    assert sorted(covered) == [r for r in range(12) if indices[r] >= 0]

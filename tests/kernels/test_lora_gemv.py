"""The 4-bit GEMV's decode variants (``GemvConfig.lookup``) and K splits (``GemvConfig.split_k``) against the reference.

The layer tests run the GEMV with the dispatcher's config only; here every (lookup, split_k) variant meets every
epilogue (LoRA term, bias, input or output scale), over NF4 and FP4, nested and plain absmax, M = 1 and 3, row
counts that are no multiple of the row block and K that no split divides into whole steps. The decode itself is
checked bitwise over all 256 byte values.
"""

import dataclasses
import itertools
import random
import zlib

import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_engine.kernels.lora_gemv as gemv_module
from lora_engine import reference
from lora_engine.format import packed_4bit
from lora_engine.kernels.configs import GEMV_LOOKUPS, GemvConfig, gemv_config, gemv_variant
from lora_engine.kernels.lora_gemv import gemv_k_split, lora_gemv_4bit
from lora_engine.testing import assert_bitwise_equal, assert_close_3way

pytestmark = pytest.mark.interpreter

SPLITS = (1, 2, 3)
VARIANTS = list(itertools.product(GEMV_LOOKUPS, SPLITS))
BLOCK_K = 64  # the K step of every case (the interpreter's default): the splits below are counted in it

# (N, K, blocksize): N is a multiple of no row block; K holds several quantization blocks and no split of it into
# 2 or 3 parts is a whole number of 64-wide steps each, so the last part is shorter (k_split in the comments).
SHAPES = {
    "b64": (20, 448, 64),  # 7 blocks, one per step; split 2: 256 + 192, split 3: 192 + 192 + 64
    "b32": (19, 448, 32),  # two blocks per step (one scale per row and block); the same parts
    "b128": (13, 640, 128),  # two steps per block, parts start on block boundaries; split 2: 384 + 256, 3: 256 x2 + 128
}
EPILOGUES = ("none", "lora", "lora_bias", "bias", "in_scale", "out_scale_bias")
RANK = 5


@dataclasses.dataclass(frozen=True)
class Case:
    lookup: str
    split_k: int
    epilogue: str
    quant_type: str
    nested: bool
    m: int
    shape: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        nest = "nested" if self.nested else "plain"
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.lookup}-split{self.split_k}-{self.epilogue}-{self.quant_type}-{nest}-M{self.m}-{self.shape}-{dt}"


def _cases() -> list[Case]:
    """Every variant with every epilogue; each variant's six cases take six different (quant type, nesting, M,
    shape, dtype) mixes from one shuffled list, so the variants see different mixes."""
    mixes = list(itertools.product(["nf4", "fp4"], [False, True], [1, 3], SHAPES, [torch.float32, torch.float16]))
    random.Random(0).shuffle(mixes)
    cases = []
    for v, (lookup, split_k) in enumerate(VARIANTS):
        for e, epilogue in enumerate(EPILOGUES):
            cases.append(Case(lookup, split_k, epilogue, *mixes[(v * len(EPILOGUES) + e) % len(mixes)]))
    return cases


CASES = _cases()


def test_cases_cover_each_variant_with_both_formats_and_token_counts():
    for lookup, split_k in VARIANTS:
        mine = [c for c in CASES if (c.lookup, c.split_k) == (lookup, split_k)]
        assert {c.epilogue for c in mine} == set(EPILOGUES)
        for field, values in (("quant_type", {"nf4", "fp4"}), ("nested", {False, True}), ("m", {1, 3})):
            assert {getattr(c, field) for c in mine} == values, f"{lookup} split {split_k} misses a {field}"


def _weight(quant_type: str, nested: bool, n: int, k: int, blocksize: int, seed: int, device: str):
    gen = torch.Generator().manual_seed(seed)
    dense = (torch.randn(n, k, generator=gen) * 0.5).to(device)
    return bnbF.quantize_4bit(dense, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _config(m: int, lookup: str, split_k: int) -> GemvConfig:
    return gemv_variant(dataclasses.replace(gemv_config(m, RANK), block_k=BLOCK_K), lookup, split_k)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_variant_matches_reference(case, kernel_device):
    n, k, blocksize = SHAPES[case.shape]
    seed = zlib.crc32(case.id.encode())
    packed, state = _weight(case.quant_type, case.nested, n, k, blocksize, seed, kernel_device)
    w32 = reference.dequantize_4bit(packed, state, torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(kernel_device)

    x, lora_A, lora_B = randn(case.m, k), randn(RANK, k, std=0.3), randn(n, RANK, std=0.3)
    bias = randn(n) if "bias" in case.epilogue else None
    in_scale = randn(k).abs() + 0.5 if case.epilogue == "in_scale" else None
    out_scale = randn(n) if case.epilogue.startswith("out_scale") else None
    lora = case.epilogue.startswith("lora")
    scaling = 1.7
    cfg = _config(case.m, case.lookup, case.split_k)
    assert gemv_k_split(k, blocksize, cfg)[1] == case.split_k, "the shape must split K into the parts asked for"

    def torch_layer(dtype):
        xd, wd = x.to(case.dtype).to(dtype), w32.to(dtype)
        if in_scale is not None:
            xd = (xd * in_scale.to(dtype)).to(case.dtype).to(dtype)  # the kernel rounds x ⊙ s to x's dtype
        y = xd @ wd.t()
        if lora:
            left = (x.to(case.dtype).to(dtype) @ lora_A.to(case.dtype).to(dtype).t()).to(torch.float32).to(dtype)
            y = y + scaling * left @ lora_B.to(case.dtype).to(dtype).t()
        if bias is not None:
            y = y + bias.to(case.dtype).to(dtype)
        return y * out_scale.to(dtype) if out_scale is not None else y

    left = (x.to(case.dtype).float() @ lora_A.to(case.dtype).float().t()) if lora else None
    got = lora_gemv_4bit(
        x.to(case.dtype), packed_4bit(packed, state),
        right=lora_B.to(case.dtype) if lora else None, left=left, scaling=scaling,
        bias=bias.to(case.dtype) if bias is not None else None, in_scale=in_scale, out_scale=out_scale, config=cfg,
    )  # fmt: skip
    assert got.dtype == case.dtype and got.shape == (case.m, n)
    precise = torch_layer(torch.float64)
    assert precise.abs().max() > 0
    assert_close_3way(case.id, got, precise, torch_layer(case.dtype).to(case.dtype))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lookups_decode_every_byte_identically(quant_type, kernel_device):
    """Every lookup gives the reference's fp32 bits for all 256 byte values: one-hot rows of x pick single
    elements of deq(W), so no rounding of the product or the sum can hide a wrong code."""
    n, k, blocksize = 16, 32, 32  # 16 rows of 16 bytes: every byte value once
    packed, state = _weight(quant_type, True, n, k, blocksize, 7, kernel_device)
    order = torch.randperm(256, generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    packed = order.reshape(packed.shape).to(kernel_device)
    expected = reference.dequantize_4bit(packed, state, torch.float32)
    weight = packed_4bit(packed, state)
    eye = torch.eye(k, device=kernel_device)
    for lookup in GEMV_LOOKUPS:
        cfg = _config(16, lookup, 1)
        decoded = torch.cat([lora_gemv_4bit(eye[k0 : k0 + 16], weight, config=cfg) for k0 in range(0, k, 16)]).t()
        assert_bitwise_equal(f"{quant_type} {lookup}", decoded, expected)


class _LaunchLog:
    """Stands in for a jitted kernel: records each launch's grid, then launches the kernel."""

    def __init__(self, kernel, grids: list):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_split_k_launches_parts_and_one_reduction(kernel_device, monkeypatch):
    main, reduce = [], []
    for name, grids in (("_lora_gemv_4bit_kernel", main), ("_lora_gemv_reduce_kernel", reduce)):
        monkeypatch.setattr(gemv_module, name, _LaunchLog(getattr(gemv_module, name), grids))
    n, k, blocksize = SHAPES["b64"]
    weight = packed_4bit(*_weight("nf4", False, n, k, blocksize, 1, kernel_device))
    x = torch.randn(2, k, device=kernel_device)
    cfg = _config(2, "table16", 1)
    row_blocks = -(-n // cfg.block_n)
    lora_gemv_4bit(x, weight, config=cfg)
    assert (main, reduce) == ([(row_blocks, 1)], []), "split_k=1 is one launch without a reduction"
    main.clear()
    cfg = dataclasses.replace(cfg, split_k=3)
    lora_gemv_4bit(x, weight, config=cfg)
    assert main == [(row_blocks, 3)] and reduce == [(-(-n // cfg.reduce_block_n),)]


def test_k_split_keeps_whole_steps_and_blocks():
    cfg = _config(1, "table16", 1)
    assert gemv_k_split(448, 64, dataclasses.replace(cfg, split_k=2)) == (256, 2)
    assert gemv_k_split(640, 128, dataclasses.replace(cfg, split_k=2)) == (384, 2)  # whole 128-blocks, not 320
    assert gemv_k_split(448, 64, dataclasses.replace(cfg, split_k=32)) == (64, 7)  # at most one part per step
    assert gemv_k_split(64, 64, dataclasses.replace(cfg, split_k=4)) == (64, 1)  # one step: no split
    assert gemv_k_split(448, 64, cfg) == (448, 1)


def test_config_refuses_unknown_lookup_and_bad_split():
    with pytest.raises(ValueError, match="lookup"):
        GemvConfig(m_pad=1, block_n=8, block_k=64, block_r=16, lookup="pairs16")
    for split_k in (0, 2.0):
        with pytest.raises(ValueError, match="split_k"):
            GemvConfig(m_pad=1, block_n=8, block_k=64, block_r=16, split_k=split_k)

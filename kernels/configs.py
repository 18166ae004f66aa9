"""Tile configurations for every kernel, in one place.

The Triton interpreter (``TRITON_INTERPRET=1``) cannot autotune (timing configs needs a GPU driver) and runs
every program in numpy, so it gets one small fixed config per kernel. On a GPU the configs below are set by
hand from measurements (``python -m bench.tune`` reports the fastest tiles per regime; a change here cites it).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .runtime import interpreter_active

MIN_DOT = 16  # smallest tile edge tl.dot accepts
# Multiply-adds contract to FMAs in the compiled kernels. Every launch states it: it is Triton 3.9's default, which
# later releases turn off, and the kernels' speed and rounding should not change with the Triton release.
FUSE_MULTIPLY_ADD = True


# Host-side integer helpers. Triton's own (triton.cdiv, triton.next_power_of_2) are constexpr functions, built to
# be called from kernels too: a host call costs microseconds (argument unwrapping, an import), several per launch.
def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive integers."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: fp32 follows torch's TF32 switch; 16-bit inputs ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def rank_block(r: int, cap: int = 64) -> int:
    """Tile edge along the LoRA rank: a power of two >= 16, at most ``cap`` (larger ranks loop over chunks)."""
    return min(max(MIN_DOT, next_power_of_2(r)), cap)


@dataclass(frozen=True)
class MatmulConfig:
    """Tiles of the GEMM with the LoRA epilogue (out tile BLOCK_M x BLOCK_N, reduction step BLOCK_K)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8  # programs that share an activation row panel, for L2 reuse
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # programs sharing one output tile along K (partial sums meet by fp32 atomics)


@dataclass(frozen=True)
class LowRankConfig:
    """Tiles of the rank-r kernels: the long dimension is swept in BLOCK_M / BLOCK_K steps."""

    block_m: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


@functools.lru_cache(maxsize=4096)  # called per launch; a pure function of its arguments and the mode
def matmul_config(m: int, n_out: int, k_red: int, dtype: torch.dtype = torch.bfloat16) -> MatmulConfig:
    """Tiles for an [m, k_red] x [k_red, n_out] product with ``dtype`` operands."""
    if interpreter_active():
        # Split K for few rows as on a GPU, so the interpreter runs the split-K variant too.
        return MatmulConfig(block_m=64, block_n=32, block_k=32, group_m=2, num_warps=1, num_stages=1,
                            split_k=2 if m <= 16 else 1)  # fmt: skip
    wide = dtype == torch.float32  # 4-byte operands: halve the K step so the pipeline fits shared memory
    if m <= 16:
        # Narrow N tiles give enough programs at M = 1 (H100, `python -m bench.tune`: 24 us for 4096x4096 on a
        # decoded bf16 weight, cuBLAS 23 us). Splitting K as well measured no better there, so split_k stays 1.
        return MatmulConfig(block_m=16, block_n=16, block_k=64 if wide else 128, group_m=1, num_warps=4,
                            num_stages=4)  # fmt: skip
    if m <= 64:
        return MatmulConfig(block_m=64, block_n=64, block_k=32 if wide else 64, num_warps=4, num_stages=4)
    return MatmulConfig(block_m=128, block_n=128, block_k=32 if wide else 64, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=4096)  # called per launch; a pure function of its arguments and the mode
def lowrank_config(m: int) -> LowRankConfig:
    """Tiles for the rank-r products (x·Aᵀ, dy·B, dB, dA)."""
    if interpreter_active():
        return LowRankConfig(block_m=64, block_k=32, num_warps=1, num_stages=1)
    if m <= 64:
        return LowRankConfig(block_m=16, block_k=128)
    return LowRankConfig(block_m=64, block_k=128)


@dataclass(frozen=True)
class MultiLoraConfig:
    """Tiles of the mixed-batch kernels: BLOCK_M sorted rows of one adapter per program, K (shrink) or N (expand)
    swept in BLOCK_K / BLOCK_N steps."""

    block_m: int
    block_k: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@functools.lru_cache(maxsize=4096)  # called per launch; a pure function of its arguments and the mode
def multi_lora_config(m: int) -> MultiLoraConfig:
    """Tiles for the mixed-batch shrink and expand kernels over ``m`` rows. Not yet tuned on a GPU: 16-row blocks
    because a segment wastes at most one partial block, and serving batches mix adapters over few rows each."""
    if interpreter_active():
        return MultiLoraConfig(block_m=16, block_k=32, block_n=32, num_warps=1, num_stages=1)
    return MultiLoraConfig(block_m=16, block_k=128, block_n=64)


DEQUANT_BLOCK = 1024  # elements decoded per program of the dequantize kernel (512 packed bytes)
DEQUANT_BLOCK_INTERPRETER = 256


GEMV_MAX_TOKENS = 16  # rows of x the 4-bit GEMV serves (the decode regime)
GEMV_LOOKUPS = ("table16", "rows16", "pairs256")  # how the GEMV turns a packed byte into two codes (lora_gemv.py)


@dataclass(frozen=True)
class GemvConfig:
    """Tiles and decode of the 4-bit GEMV: BLOCK_N rows of W per program, K swept in BLOCK_K steps, M padded to M_PAD.

    ``lookup``: "table16" looks each nibble up in one 16-entry table of the codes (two gathers per packed byte);
    "rows16" does the same from the codes broadcast to every row (Triton 3.9 keeps that gather in registers; 3.6
    fails to compile it for some tiles); "pairs256" looks each byte up once in a 256-entry table of (high, low)
    code pairs built by every program from the 16 codes. All give the same bits. ``split_k``: programs that share
    a row block's K sweep, each over whole quantization blocks; above 1 they write fp32 partial sums to a workspace
    of the call and a second launch adds them in a fixed order and applies the LoRA term, bias and output scale. 1
    is one launch, no workspace.
    """

    m_pad: int
    block_n: int
    block_k: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 3
    lookup: str = "table16"
    split_k: int = 1

    def __post_init__(self) -> None:
        if self.lookup not in GEMV_LOOKUPS:
            raise ValueError(f"GemvConfig.lookup must be one of {GEMV_LOOKUPS}, got {self.lookup!r}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"GemvConfig.split_k must be a positive integer, got {self.split_k!r}")

    @property
    def reduce_block_n(self) -> int:
        """Columns per program of the split-K reduction: its LoRA product (m_pad x columns x block_r fp32) stays
        near 8K values, as the GEMV's per-step product does, and at most 128 columns."""
        return max(1, min(128, 8192 // (self.m_pad * self.block_r)))


def gemv_variant(tiles: GemvConfig, lookup: str, split_k: int = 1) -> GemvConfig:
    """``tiles`` with another code lookup and K split. For "rows16" a row block keeps at least two rows per warp:
    with fewer, Triton 3.6's gather-layout pass fails to compile that lookup (3.9 compiles it)."""
    cfg = dataclasses.replace(tiles, lookup=lookup, split_k=split_k)
    if lookup == "rows16":
        cfg = dataclasses.replace(cfg, block_n=max(cfg.block_n, 2 * cfg.num_warps))
    return cfg


@functools.lru_cache(maxsize=4096)  # called per launch; a pure function of its arguments and the mode
def gemv_config(m: int, rank: int) -> GemvConfig:
    """Tiles for the GEMV over ``m`` <= GEMV_MAX_TOKENS rows with a rank-``rank`` LoRA term.

    Not yet tuned on a GPU: the per-step product holds m_pad x BLOCK_N x BLOCK_K fp32 values, kept near 8K
    so it stays in registers, and narrow row blocks give thousands of programs on Llama-sized weights. The
    16-entry table lookup (it compiles for every tile of the tune sweep on Triton 3.6 and 3.9) and one program
    per row block (split_k 1) until ``python -m bench.tune --weights gemv`` has timed the other variants.
    """
    m_pad = next_power_of_2(max(m, 1))
    block_r = min(next_power_of_2(max(rank, 1)), 32)
    if interpreter_active():
        return GemvConfig(m_pad=m_pad, block_n=8, block_k=64, block_r=block_r, num_warps=1, num_stages=1)
    block_k = 256
    return GemvConfig(m_pad=m_pad, block_n=max(2, 8192 // (m_pad * block_k)), block_k=block_k, block_r=block_r)

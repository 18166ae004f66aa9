"""Counter-based dropout on the LoRA branch: no mask is stored, it is redrawn from (seed, element index).

Element (m, k) of the flattened [M, K] input is kept when the top 24 bits of Philox-4x32-10
``tl.randint(seed, m * K + k)`` are >= ``threshold`` (``threshold = round(p * 2**24)``), and kept elements
are scaled by ``1 / (1 - p)``. ``lora_engine.reference.dropout_keep_mask`` draws the same bits in torch.
"""

import triton
import triton.language as tl

KEEP_BITS: tl.constexpr = tl.constexpr(24)  # random bits compared against the threshold


@triton.jit
def keep_scale(seed, rows, cols, row_stride, threshold, inv_keep_prob):
    """``1 / (1 - p)`` where element (rows[:, None], cols[None, :]) is kept, else 0 (fp32)."""
    offsets = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    bits = tl.randint(seed, offsets) >> (32 - KEEP_BITS)
    return tl.where(bits.to(tl.int32) >= threshold, inv_keep_prob, 0.0)

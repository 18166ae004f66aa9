"""In-register decoding of bitsandbytes 4-bit weights, shared by the dequantize and GEMM kernels.

Layout (bitsandbytes' own, read in place): W[N, K] is flattened row-major; flat element ``f`` lives in byte
``f // 2``, in the high nibble when ``f`` is even. The nibble indexes a 16-entry fp32 code table (NF4 or
FP4). Every ``blocksize`` consecutive flat elements share one scale ``absmax[f // blocksize]``; when
``K % blocksize != 0`` a block straddles two rows. With double quantization the scale itself is stored as
a uint8 code: ``absmax = code2[q[b]] * absmax2[b // blocksize2] + offset``.
"""

import triton
import triton.language as tl


@triton.jit
def block_scales(
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    block_idx,
    mask,
    blocksize2,
    NESTED: tl.constexpr,
):
    """fp32 scale of the 4-bit blocks ``block_idx`` (any shape); 0 where ``mask`` is false."""
    if NESTED:
        q = tl.load(absmax_ptr + block_idx, mask=mask, other=0).to(tl.int32)
        outer = tl.load(absmax2_ptr + block_idx // blocksize2, mask=mask, other=0.0)
        # Multiply, then add: bitsandbytes rounds the product before adding the offset (no FMA).
        scale = tl.load(code2_ptr + q) * outer
        scale = scale + tl.load(offset_ptr)
        scale = tl.where(mask, scale, 0.0)
    else:
        scale = tl.load(absmax_ptr + block_idx, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def decode_4bit_tile(
    W_ptr,
    code_ptr,
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    rows,
    col0,
    N,
    K,
    blocksize2,
    BLOCKSIZE: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    NESTED: tl.constexpr,
    PAIRED: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
):
    """deq(W)[rows, col0 : col0 + BLOCK_COLS] as fp32, zero outside W.

    PAIRED (K even, col0 even): one byte load yields two neighbours of a row, split by interleaving the
    nibbles; otherwise each element finds its own byte (rows may then start mid-byte).
    SCALE_PER_ROW (blocksize divides K, the tile lies inside one block): one scale per row instead of one per
    element.
    """
    cols = col0 + tl.arange(0, BLOCK_COLS)
    row_ok = rows < N
    # The 16 codes held in registers, looked up with tl.gather: a global-memory gather per element costs more
    # than the tensor-core work it feeds.
    table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (rows.shape[0], 16))
    mask = row_ok[:, None] & (cols[None, :] < K)
    row_start = rows.to(tl.int64) * K
    if PAIRED:
        pairs = col0 // 2 + tl.arange(0, BLOCK_COLS // 2)
        pair_mask = row_ok[:, None] & (pairs[None, :] < K // 2)
        packed = tl.load(W_ptr + (row_start // 2)[:, None] + pairs[None, :], mask=pair_mask, other=0)
        packed = packed.to(tl.int32)
        values = tl.interleave(tl.gather(table, packed >> 4, axis=1), tl.gather(table, packed & 15, axis=1))
    else:
        flat = row_start[:, None] + cols[None, :]
        packed = tl.load(W_ptr + flat // 2, mask=mask, other=0)
        nibble = (packed.to(tl.int32) >> (4 - 4 * (flat % 2)).to(tl.int32)) & 15
        values = tl.gather(table, nibble, axis=1)
    if SCALE_PER_ROW:
        blocks = row_start // BLOCKSIZE + col0 // BLOCKSIZE
        scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, row_ok, blocksize2, NESTED)
        values = values * scale[:, None]
    else:
        blocks = (row_start[:, None] + cols[None, :]) // BLOCKSIZE
        scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, mask, blocksize2, NESTED)
        values = values * scale
    # Keep padding exactly zero so an Inf scale in a partial tile cannot leak NaN into the product.
    return tl.where(mask, values, 0.0)

"""Host-side operand bundles the launchers take. Importing this module does not import Triton."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

KEEP_BITS = 24  # random bits a dropout decision compares; must match dropout.KEEP_BITS


class Packed4bit(NamedTuple):
    """The tensors and sizes of a bitsandbytes 4-bit weight W[n, k], as the kernels read them."""

    data: torch.Tensor  # uint8, ceil(n * k / 2) packed bytes
    code: torch.Tensor  # fp32[16] code table
    absmax: torch.Tensor  # fp32 per block, or uint8 codes when nested
    absmax2: Optional[torch.Tensor]  # fp32 scale per blocksize2 absmax codes (nested only)
    code2: Optional[torch.Tensor]  # fp32[256] code table of the absmax codes (nested only)
    offset: Optional[torch.Tensor]  # fp32 scalar added to decoded absmax (nested only)
    n: int
    k: int
    blocksize: int
    blocksize2: int  # 0 when not nested

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def kernel_args(self) -> tuple:
        """Pointer arguments in the order the kernels take them (placeholders when not nested)."""
        if self.nested:
            return self.data, self.code, self.absmax, self.absmax2, self.code2, self.offset
        return self.data, self.code, self.absmax, self.absmax, self.code, self.code


class Dropout(NamedTuple):
    """Counter-based dropout of element (m, j) of an [M, row_length] input (see ``dropout.py``)."""

    seed: int
    p: float
    row_length: int

    @property
    def threshold(self) -> int:
        return int(round(self.p * 2**KEEP_BITS))

    @property
    def inv_keep_prob(self) -> float:
        return 1.0 / (1.0 - self.p)

    def kernel_args(self) -> tuple[int, int, float, int]:
        """``(seed, threshold, inv_keep_prob, row_length)``, the scalars the kernels take."""
        return self.seed, self.threshold, self.inv_keep_prob, self.row_length


# The dropout scalars of a launch without dropout (the kernels' DROPOUT flag is off and never reads them), made once
NO_DROPOUT_ARGS = Dropout(0, 0.0, 0).kernel_args()

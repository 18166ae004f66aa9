"""Adapter kinds: one operand bundle per kind, the tensors and numbers its kernels and gradients need.

    Lora   y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias              trainable: A [r, in], B [out, r]
    IA3    y = (x ⊙ l)·Wᵀ + bias         (scales_input)     trainable: l [in]   (PEFT's feed-forward layers)
           y = (x·Wᵀ + bias) ⊙ l         (otherwise)        trainable: l [out]  (PEFT's other layers)
    Dora   y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias,  g = m / ‖W + s·B·A‖ (row norms, not differentiated: PEFT's rule)
           with dropout (PEFT's rule in training): y = x·Wᵀ + bias + (g − 1) ⊙ (xd·Wᵀ) + g ⊙ s·(xd·Aᵀ)·Bᵀ,
           xd = drop(x)                                     trainable: A, B, m [out]
    MultiLora  y[m] = x[m]·Wᵀ + s_i·(x[m]·A_iᵀ)·B_iᵀ + bias,  i = idx[m]  (idx[m] = -1: the base alone)
                                                            trainable: every A_i, B_i (no dropout)
    LowRank    y = x·Wᵀ + s·left·Bᵀ + bias,  left [M, r] computed by the caller (LoRA's drop(x)·Aᵀ made by
               the LoRA modules themselves, e.g. a mask per adapter drawn as PEFT draws it)
                                                            differentiable: left, B (x gets dy·W only)

A bundle says which of its tensors are trained (``trainables``, in the order their gradients come back),
rebuilds itself around autograd's copies of them (``with_trainables``), and gives its layer as torch operations
on a dense fp32 weight (``dense_forward``: the differentiable backward differentiates it). The kernels' forward
and backward of each kind live in ``autograd.py`` (``KINDS``), shared by the ``autograd.Function`` and the
``torch.library`` ops. Importing this module does not import Triton.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from .dispatch import host_to_device
from .kernels.operands import Dropout


class Lora(NamedTuple):
    """A LoRA adapter: ``s·(drop(x)·Aᵀ)·Bᵀ`` added to the base product."""

    lora_A: torch.Tensor  # [r, in_features]
    lora_B: torch.Tensor  # [out_features, r]
    scaling: float
    dropout: Optional[Dropout]  # on the LoRA branch only; None when off

    def trainables(self) -> tuple[torch.Tensor, ...]:
        return self.lora_A, self.lora_B

    def with_trainables(self, tensors: Sequence[torch.Tensor]) -> "Lora":
        if tensors[0] is self.lora_A and tensors[1] is self.lora_B:  # autograd passes these very tensors back
            return self
        return self._replace(lora_A=tensors[0], lora_B=tensors[1])

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer in torch operations (all operands fp32, dense weight [out, in])."""
        from .reference import dropout_keep_scale

        x_lora = x
        if self.dropout is not None:
            x_lora = x * dropout_keep_scale(self.dropout.seed, x.shape[0], x.shape[1], self.dropout.p, x.device)
        y = x @ weight.t() + self.scaling * ((x_lora @ self.lora_A.float().t()) @ self.lora_B.float().t())
        return y if bias is None else y + bias


class IA3(NamedTuple):
    """An IA3 adapter: the base layer's input (``scales_input``) or output scaled per feature by ``scale``."""

    scale: torch.Tensor  # [in_features] when scales_input, else [out_features]; contiguous
    scales_input: bool

    def trainables(self) -> tuple[torch.Tensor, ...]:
        return (self.scale,)

    def with_trainables(self, tensors: Sequence[torch.Tensor]) -> "IA3":
        return self._replace(scale=tensors[0])

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer in torch operations (all operands fp32, dense weight [out, in])."""
        scale = self.scale.float()
        if self.scales_input:
            y = (x * scale) @ weight.t()
            return y if bias is None else y + bias
        y = x @ weight.t()
        return (y if bias is None else y + bias) * scale


class Dora(NamedTuple):
    """A DoRA adapter: the LoRA product and the base product rescaled per output row by g = m / ‖W + sBA‖.

    With ``dropout``, PEFT's DoRA in training: the base product of x as is, plus the DoRA term of the dropped input
    xd, ``(g − 1) ⊙ (xd·Wᵀ) + g ⊙ s·(xd·Aᵀ)·Bᵀ`` (a second base product, without the bias).
    """

    lora_A: torch.Tensor  # [r, in_features]
    lora_B: torch.Tensor  # [out_features, r]
    magnitude: torch.Tensor  # [out_features]
    scaling: float
    base_norm_sq: torch.Tensor  # fp32 [out_features]: ‖W‖² of each row, once per (frozen) weight
    dropout: Optional[Dropout] = None  # on the DoRA term's input; None when off

    def trainables(self) -> tuple[torch.Tensor, ...]:
        return self.lora_A, self.lora_B, self.magnitude

    def with_trainables(self, tensors: Sequence[torch.Tensor]) -> "Dora":
        return self._replace(lora_A=tensors[0], lora_B=tensors[1], magnitude=tensors[2])

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer in torch operations (all operands fp32, dense weight [out, in])."""
        from .reference import dora_term, dropout_keep_scale

        keep_scale = None
        if self.dropout is not None:
            keep_scale = dropout_keep_scale(self.dropout.seed, x.shape[0], x.shape[1], self.dropout.p, x.device)
        return dora_term(x, weight, self.lora_A, self.lora_B, self.magnitude, self.scaling, bias, keep_scale)


class MultiLora(NamedTuple):
    """A mixed batch: row m of x takes LoRA adapter ``indices[m]`` (its own rank and scaling), -1 the base alone.

    No dropout. Its forward and backward live in ``autograd.multi_lora_forward`` and ``autograd.multi_lora_backward``
    (called by ``autograd.MultiLoraFunction`` and the mixed-batch custom ops) rather than ``autograd.KINDS``: the
    rows are grouped by adapter once per call and the base product runs once for all of them.
    """

    lora_As: tuple[torch.Tensor, ...]  # each [r_i, in_features]
    lora_Bs: tuple[torch.Tensor, ...]  # each [out_features, r_i]
    scalings: tuple[float, ...]
    indices: torch.Tensor  # int64 [M], values in [-1, len(lora_As))

    def trainables(self) -> tuple[torch.Tensor, ...]:
        return (*self.lora_As, *self.lora_Bs)

    def stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A [n, r_max, in], B [n, out, r_max], scalings fp32 [n])``: the factors in ``dtype``, zero-padded to the
        largest rank (zeros add nothing to the products). Built per call: nothing cached to go stale."""
        r_max = max(a.shape[0] for a in self.lora_As)
        n, k, out = len(self.lora_As), self.lora_As[0].shape[1], self.lora_Bs[0].shape[0]
        device = self.lora_As[0].device
        stacked_A = torch.zeros((n, r_max, k), dtype=dtype, device=device)
        stacked_B = torch.zeros((n, out, r_max), dtype=dtype, device=device)
        for i, (lora_A, lora_B) in enumerate(zip(self.lora_As, self.lora_Bs)):
            stacked_A[i, : lora_A.shape[0]] = lora_A.detach()
            stacked_B[i, :, : lora_B.shape[1]] = lora_B.detach()
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # one fill per adapter, the values baked into the graph (a host copy cannot be captured)
            scalings = torch.empty(n, dtype=torch.float32, device=device)
            for i, scaling in enumerate(self.scalings):
                scalings[i].fill_(scaling)
        else:
            scalings = host_to_device(torch.tensor(self.scalings, dtype=torch.float32), device, "scalings")
        return stacked_A, stacked_B, scalings

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer in torch operations (all operands fp32, dense weight [out, in])."""
        y = x @ weight.t()
        for i, (lora_A, lora_B, scaling) in enumerate(zip(self.lora_As, self.lora_Bs, self.scalings)):
            rows = (self.indices == i).nonzero().flatten()
            y = y.index_add(0, rows, scaling * ((x[rows] @ lora_A.float().t()) @ lora_B.float().t()))
        return y if bias is None else y + bias


class LowRank(NamedTuple):
    """A low-rank term whose left factor the caller computed: ``s·left·Bᵀ`` added to the base product.

    For a LoRA whose factors only their own modules can produce: ``left = lora_A(drop(x))`` and B (FSDP gathers a
    module sharded on its own only in that module's forward). The kernels never see A or the dropout: the gradient
    of x here is dy·W alone, and ``dleft = s·dy·B`` reaches A and x through the graph that made ``left``.
    """

    left: torch.Tensor  # [M, r], any float dtype
    lora_B: torch.Tensor  # [out_features, r], any strides
    scaling: float

    def trainables(self) -> tuple[torch.Tensor, ...]:
        return self.left, self.lora_B

    def with_trainables(self, tensors: Sequence[torch.Tensor]) -> "LowRank":
        return self._replace(left=tensors[0], lora_B=tensors[1])

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer in torch operations (all operands fp32, dense weight [out, in])."""
        y = x @ weight.t() + self.scaling * (self.left.float() @ self.lora_B.float().t())
        return y if bias is None else y + bias


Adapter = Union[Lora, IA3, Dora, LowRank]

"""Drop-in nn.Modules: a LoRA adapter over a frozen 4-bit (bitsandbytes) or dense linear layer."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from . import functional as F
from .format import is_cpu_packed, packed_bytes, quantize_weight, weight_shape


class _LoRAAdapter(nn.Module):
    """The trainable low-rank pair shared by both layers: ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    def _init_lora(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: Optional[float],
        lora_dropout: float,
        device: Optional[torch.device],
        lora_dtype: torch.dtype,
    ) -> None:
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = float(r if lora_alpha is None else lora_alpha)
        self.scaling = self.lora_alpha / r
        self.lora_dropout = float(lora_dropout)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=lora_dtype))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero, so training starts at the base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _lora_delta(self) -> torch.Tensor:
        """``scaling · B·A`` in fp32."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}, bias={self.bias is not None}"
        )


def _frozen(param: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    if param is None:
        return None
    return param.requires_grad_(False) if isinstance(param, nn.Parameter) else nn.Parameter(param, requires_grad=False)


class LoRALinear4bit(_LoRAAdapter):
    """``y = x·deq(W)ᵀ + (lora_alpha / r)·(dropout(x)·Aᵀ)·Bᵀ + bias`` over a frozen bitsandbytes 4-bit W.

    ``weight`` is the bitsandbytes ``Params4bit`` (with ``.quant_state``), read in place by the kernels; the
    state dict carries bitsandbytes' own keys (``weight``, ``weight.absmax``, ``weight.quant_map``, ...)
    plus ``lora_A`` and ``lora_B``. Inputs are cast to ``compute_dtype`` (when set) and the output back.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        *,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        blocksize: int = 64,
        compute_dtype: Optional[torch.dtype] = None,
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device] = None,
        lora_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device)
        weight = quantize_weight(dense.weight.data, quant_type, blocksize, compress_statistics, quant_storage)
        self._setup(weight, dense.bias, r, lora_alpha, lora_dropout, compute_dtype, lora_dtype)

    def _setup(
        self,
        weight: Any,
        bias: Optional[torch.Tensor],
        r: int,
        lora_alpha: Optional[float],
        lora_dropout: float,
        compute_dtype: Optional[torch.dtype],
        lora_dtype: torch.dtype,
    ) -> None:
        out_features, in_features = weight_shape(weight, weight.quant_state)
        self.weight = weight
        self.bias = _frozen(bias)
        self.compute_dtype = compute_dtype
        self._init_lora(in_features, out_features, r, lora_alpha, lora_dropout, packed_bytes(weight).device, lora_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        *,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        blocksize: int = 64,
        compute_dtype: Optional[torch.dtype] = None,
        quant_storage: torch.dtype = torch.uint8,
        lora_dtype: torch.dtype = torch.float32,
    ) -> "LoRALinear4bit":
        """Quantize ``linear``'s weight through bitsandbytes and add a fresh LoRA adapter."""
        weight = quantize_weight(linear.weight.data, quant_type, blocksize, compress_statistics, quant_storage)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(weight, bias, r, lora_alpha, lora_dropout, compute_dtype, lora_dtype)
        return layer

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        r: int = 8,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        *,
        compute_dtype: Optional[torch.dtype] = None,
        lora_dtype: torch.dtype = torch.float32,
    ) -> "LoRALinear4bit":
        """Wrap a quantized ``bitsandbytes.nn.Linear4bit``: its weight and bias are shared, not copied (and frozen)."""
        weight = linear4bit.weight
        if getattr(weight, "quant_state", None) is None:
            raise ValueError("from_bnb needs a quantized Linear4bit: move it to its device first (e.g. .to('cuda'))")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        compute_dtype = compute_dtype if compute_dtype is not None else getattr(linear4bit, "compute_dtype", None)
        layer._setup(weight, linear4bit.bias, r, lora_alpha, lora_dropout, compute_dtype, lora_dtype)
        return layer

    @property
    def quant_state(self) -> Any:
        return self.weight.quant_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype or x.dtype
        y = F.lora_linear_4bit(
            x.to(compute), self.weight, self.weight.quant_state, self.lora_A, self.lora_B, self.scaling,
            bias=self.bias, dropout_p=self.lora_dropout, training=self.training,
        )  # fmt: skip
        return y.to(x.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The frozen base weight as a dense [out, in] tensor."""
        return F.dequantize_4bit(self.weight, self.weight.quant_state, dtype or torch.float32)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """An nn.Linear holding ``W + scaling·B·A`` (and the bias) in the compute dtype."""
        dtype = self.compute_dtype or self.weight.quant_state.dtype
        merged = self.dequantize(torch.float32) + self._lora_delta()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=merged.device)
        linear.weight.data = merged.to(dtype)
        if self.bias is not None:
            linear.bias.data = self.bias.detach().to(dtype).clone()
        return linear.requires_grad_(False)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if is_cpu_packed(self.weight.quant_state):
            # bitsandbytes repacked the weight for its CPU kernel: save its standard layout, as bitsandbytes does.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            self.weight.data, self.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                self.weight.data, self.weight.quant_state
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        from bitsandbytes.nn import Params4bit

        weight_key = prefix + "weight"
        quant_keys = [key for key in state_dict if key.startswith(weight_key + ".")]
        if weight_key in state_dict and quant_keys:
            stats = {key[len(weight_key) + 1 :]: state_dict[key] for key in quant_keys}
            device = packed_bytes(self.weight).device
            self.weight = Params4bit.from_prequantized(state_dict[weight_key], stats, device=device)
            n_k = weight_shape(self.weight, self.weight.quant_state)
            if n_k != (self.out_features, self.in_features):
                error_msgs.append(f"{weight_key}: checkpoint is {n_k}, layer is {(self.out_features, self.in_features)}")
        rest = {key: value for key, value in state_dict.items() if key != weight_key and key not in quant_keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if weight_key in missing_keys and weight_key in state_dict:
            missing_keys.remove(weight_key)


class LoRALinear(_LoRAAdapter):
    """``y = x·Wᵀ + (lora_alpha / r)·(dropout(x)·Aᵀ)·Bᵀ + bias`` over a frozen dense (fp16/bf16/fp32) W.

    Runs the same GEMM-with-LoRA-epilogue kernels as the 4-bit layer, without the decode.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        lora_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(dense.weight, dense.bias, r, lora_alpha, lora_dropout, lora_dtype)

    def _setup(self, weight, bias, r, lora_alpha, lora_dropout, lora_dtype) -> None:
        out_features, in_features = weight.shape
        self.weight = _frozen(weight)
        self.bias = _frozen(bias)
        self._init_lora(in_features, out_features, r, lora_alpha, lora_dropout, weight.device, lora_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        *,
        lora_dtype: torch.dtype = torch.float32,
    ) -> "LoRALinear":
        """Add a LoRA adapter to ``linear``, sharing (and freezing) its weight and bias."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, r, lora_alpha, lora_dropout, lora_dtype)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.lora_linear(
            x.to(self.weight.dtype), self.weight, self.lora_A, self.lora_B, self.scaling,
            bias=self.bias, dropout_p=self.lora_dropout, training=self.training,
        )  # fmt: skip
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """An nn.Linear holding ``W + scaling·B·A`` (and the bias) in the weight's dtype."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
            dtype=self.weight.dtype,
        )  # fmt: skip
        linear.weight.copy_(self.weight.float() + self._lora_delta())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

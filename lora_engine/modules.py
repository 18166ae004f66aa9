"""Drop-in nn.Modules: a LoRA adapter over a frozen 4-bit (bitsandbytes) or dense linear layer."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import nn

from . import functional as F
from .format import check_quant_stats, is_cpu_packed, packed_bytes, quantize_weight, weight_shape


@dataclasses.dataclass
class AdapterWeights:
    """One named LoRA adapter of a layer: its pair (``lora_A`` (r, in), ``lora_B`` (out, r)) and hyper-parameters."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    r: int
    lora_alpha: float
    scaling: float
    lora_dropout: float
    use_rslora: bool


def _check_adapter_name(name: Any) -> None:
    # PEFT puts the name inside state-dict keys and ModuleDict keys: a dot would change the key's structure
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")


class _LoRAAdapter(nn.Module):
    """The trainable low-rank pairs shared by both layers, one per named adapter, one of them active.

    The active adapter's pair is registered as the parameters ``lora_A`` and ``lora_B`` (with ``r``,
    ``lora_alpha``, ``scaling``, ``lora_dropout`` as plain attributes), so a one-adapter layer has exactly the
    parameters and state-dict keys it always had. The other adapters are parked off the registered parameters:
    they are not trained, not in ``parameters()`` nor ``state_dict()``, but follow ``.to()``/``.half()``.
    ``set_adapter(name)`` swaps a parked pair in (the same Parameter objects, so an optimizer holding them
    keeps working); ``set_adapter(None)`` leaves no adapter active and the layer computes its frozen base alone.
    """

    def _init_lora(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: Optional[float],
        lora_dropout: float,
        device: Optional[torch.device],
        lora_dtype: torch.dtype,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.active_adapter: Optional[str] = None
        self._parked: dict[str, AdapterWeights] = {}
        self._adapter_order: list[str] = []
        self.add_adapter(
            adapter_name, r, lora_alpha, lora_dropout, use_rslora=use_rslora, lora_dtype=lora_dtype, device=device
        )
        self.set_adapter(adapter_name)

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter of this layer, in the order they were added."""
        return list(self._adapter_order)

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        lora_dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        """Add a fresh adapter (PEFT's initialisation), parked: ``set_adapter(name)`` makes it the active one.

        ``lora_alpha`` defaults to ``r``; rsLoRA scales by ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        ``lora_dtype`` defaults to the dtype of the layer's first adapter (fp32 for the first).
        """
        _check_adapter_name(name)
        if name in self._adapter_order:
            raise ValueError(f"adapter {name!r} already exists on this layer (adapters: {self._adapter_order})")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if lora_dtype is None:
            lora_dtype = self.get_adapter(self._adapter_order[0]).lora_A.dtype if self._adapter_order else torch.float32
        device = device if device is not None else self.weight.device
        alpha = float(r if lora_alpha is None else lora_alpha)
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=lora_dtype))
        lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=lora_dtype))
        _init_pair(lora_A, lora_B)
        self._parked[name] = AdapterWeights(lora_A, lora_B, r, alpha, scaling, float(lora_dropout), bool(use_rslora))
        self._adapter_order.append(name)

    def set_adapter(self, name: Optional[str]) -> None:
        """Make adapter ``name`` the active one (``None``: none, the layer runs its frozen base alone)."""
        if name is not None and name not in self._adapter_order:
            raise ValueError(f"unknown adapter {name!r}; this layer has {self._adapter_order}")
        if name == self.active_adapter:
            return
        if self.active_adapter is not None:
            self._parked[self.active_adapter] = self.get_adapter(self.active_adapter)
        if name is None:
            self.lora_A = None
            self.lora_B = None
            self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_rslora = 0, 0.0, 0.0, 0.0, False
        else:
            w = self._parked.pop(name)
            self.lora_A = w.lora_A
            self.lora_B = w.lora_B
            self.r, self.lora_alpha, self.scaling = w.r, w.lora_alpha, w.scaling
            self.lora_dropout, self.use_rslora = w.lora_dropout, w.use_rslora
        self.active_adapter = name

    def get_adapter(self, name: str) -> AdapterWeights:
        """Adapter ``name``'s live Parameters and hyper-parameters (the active one's or a parked one's)."""
        if name == self.active_adapter:
            return AdapterWeights(
                self.lora_A, self.lora_B, self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_rslora
            )
        if name not in self._parked:
            raise ValueError(f"unknown adapter {name!r}; this layer has {self._adapter_order}")
        return dataclasses.replace(self._parked[name])

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; if it was active, none is active afterwards."""
        if name not in self._adapter_order:
            raise ValueError(f"unknown adapter {name!r}; this layer has {self._adapter_order}")
        if name == self.active_adapter:
            self.set_adapter(None)
        del self._parked[name]
        self._adapter_order.remove(name)

    def _apply(self, fn, recurse: bool = True):
        # Parked adapters are not registered parameters; move and cast them along with the rest, in place
        # (the same Parameter objects, as nn.Module does for registered ones).
        super()._apply(fn, recurse)
        with torch.no_grad():
            for w in self._parked.values():
                for param in (w.lora_A, w.lora_B):
                    param.data = fn(param.data)
        return self

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero, so training starts at the base."""
        if self.lora_A is not None:
            _init_pair(self.lora_A, self.lora_B)

    def _lora_delta(self) -> torch.Tensor:
        """``scaling · B·A`` in fp32 (zero when no adapter is active)."""
        if self.lora_A is None:
            return torch.zeros((), device=self.weight.device)
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}, bias={self.bias is not None}"
        )
        if self._adapter_order != ["default"] or self.active_adapter != "default":
            text += f", active_adapter={self.active_adapter!r}, adapters={self._adapter_order}"
        return text


def _init_pair(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """PEFT's default: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero, so training starts at the base."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)


def _base_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x·Wᵀ + bias`` in x's dtype: a layer with no active adapter."""
    return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _check_floating_input(x: torch.Tensor) -> None:
    # the layers cast x to their compute dtype and the output back: an integer x would come back truncated
    if isinstance(x, torch.Tensor) and not x.dtype.is_floating_point:
        raise TypeError(f"input must be a floating point tensor, got {x.dtype}")


def _frozen(param: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    if param is None:
        return None
    return param.requires_grad_(False) if isinstance(param, nn.Parameter) else nn.Parameter(param, requires_grad=False)


class LoRALinear4bit(_LoRAAdapter):
    """``y = x·deq(W)ᵀ + (lora_alpha / r)·(dropout(x)·Aᵀ)·Bᵀ + bias`` over a frozen bitsandbytes 4-bit W.

    ``weight`` is the bitsandbytes ``Params4bit`` (with ``.quant_state``), frozen, read in place by the kernels; the
    state dict carries bitsandbytes' own keys (``weight``, ``weight.absmax``, ``weight.quant_map``, ...)
    plus ``lora_A`` and ``lora_B`` (the active adapter's). ``load_state_dict`` is all or nothing: a 4-bit weight
    comes with its statistics and its own format; a dense ``weight`` alone (an nn.Linear state dict) is quantized
    in the layer's format; on any error the layer is left as it was. Floating-point inputs are cast to
    ``compute_dtype`` (when set) and the output back. More named adapters: ``add_adapter``, ``set_adapter``,
    ``delete_adapter`` (see ``_LoRAAdapter``).

    Mixed batches: ``layer(x, adapter_indices=idx)`` runs row m of x through adapter
    ``adapter_names[idx[m]]`` (-1: the base alone), whichever adapter is active; ``idx`` is an integer tensor of
    shape ``x.shape[:-1]`` (one per row) or ``(x.shape[0],)`` (one per sample). Adapters of different ranks and
    scalings mix in one call (``lora_engine.multi_lora_linear_4bit``): the base product once, then each row's
    low-rank term; gradients reach x and every adapter's factors. No dropout there: in training mode with
    ``lora_dropout`` on an adapter it raises.
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
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device)
        weight = quantize_weight(dense.weight.data, quant_type, blocksize, compress_statistics, quant_storage)
        self._setup(
            weight, dense.bias, r, lora_alpha, lora_dropout, compute_dtype, lora_dtype, use_rslora, adapter_name
        )

    def _setup(
        self,
        weight: Any,
        bias: Optional[torch.Tensor],
        r: int,
        lora_alpha: Optional[float],
        lora_dropout: float,
        compute_dtype: Optional[torch.dtype],
        lora_dtype: torch.dtype,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> None:
        out_features, in_features = weight_shape(weight, weight.quant_state)
        self.weight = weight.requires_grad_(False)  # frozen even where a float quant_storage would let it train
        self.bias = _frozen(bias)
        self.compute_dtype = compute_dtype
        device = packed_bytes(weight).device
        self._init_lora(
            in_features, out_features, r, lora_alpha, lora_dropout, device, lora_dtype, use_rslora, adapter_name
        )

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
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> "LoRALinear4bit":
        """Quantize ``linear``'s weight through bitsandbytes and add a fresh LoRA adapter."""
        weight = quantize_weight(linear.weight.data, quant_type, blocksize, compress_statistics, quant_storage)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(weight, bias, r, lora_alpha, lora_dropout, compute_dtype, lora_dtype, use_rslora, adapter_name)
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
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> "LoRALinear4bit":
        """Wrap a quantized ``bitsandbytes.nn.Linear4bit``: its weight and bias are shared, not copied (and frozen)."""
        weight = linear4bit.weight
        if getattr(weight, "quant_state", None) is None:
            raise ValueError("from_bnb needs a quantized Linear4bit: move it to its device first (e.g. .to('cuda'))")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        compute_dtype = compute_dtype if compute_dtype is not None else getattr(linear4bit, "compute_dtype", None)
        layer._setup(
            weight, linear4bit.bias, r, lora_alpha, lora_dropout, compute_dtype, lora_dtype, use_rslora, adapter_name
        )
        return layer

    @property
    def quant_state(self) -> Any:
        return self.weight.quant_state

    def _apply(self, fn, recurse: bool = True):
        # The packed weight holds codes, not numbers: a module-wide cast (.half(), .to(dtype)) must move it but never
        # convert it value by value, whatever its quant_storage. Casts leave integer tensors alone, so it goes through
        # them seen as bytes (bitsandbytes' Params4bit.to still moves its quant state).
        storage = self.weight.dtype
        if storage != torch.uint8:
            self.weight.data = self.weight.data.view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            if self.weight.dtype != storage:
                self.weight.data = self.weight.data.view(storage)

    def forward(self, x: torch.Tensor, adapter_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_floating_input(x)
        compute = self.compute_dtype or x.dtype
        if adapter_indices is not None:
            return self._mixed_forward(x, adapter_indices, compute)
        if self.lora_A is None:  # no adapter active: the base-only path, which makes no dense copy of W
            return F.linear_4bit(x.to(compute), self.weight, self.weight.quant_state, self.bias).to(x.dtype)
        y = F.lora_linear_4bit(
            x.to(compute), self.weight, self.weight.quant_state, self.lora_A, self.lora_B, self.scaling,
            bias=self.bias, dropout_p=self.lora_dropout, training=self.training,
        )  # fmt: skip
        return y.to(x.dtype)

    def _mixed_forward(self, x: torch.Tensor, adapter_indices: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """Each row of x through its own adapter (indices into ``adapter_names``, -1: none), without dropout."""
        adapters = [self.get_adapter(name) for name in self._adapter_order]
        if self.training and any(w.lora_dropout > 0 for w in adapters):
            raise ValueError(
                "adapter_indices runs no dropout, but the layer is in training mode with lora_dropout on an adapter: "
                "call .eval(), or set the adapters' lora_dropout to 0 to train them on mixed batches"
            )
        y = F.multi_lora_linear_4bit(
            x.to(compute), self.weight, self.weight.quant_state, [w.lora_A for w in adapters],
            [w.lora_B for w in adapters], [w.scaling for w in adapters], adapter_indices, bias=self.bias,
        )  # fmt: skip
        return y.to(x.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The frozen base weight as a dense [out, in] tensor."""
        return F.dequantize_4bit(self.weight, self.weight.quant_state, dtype or torch.float32)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """An nn.Linear holding ``W + scaling·B·A`` (the active adapter; and the bias) in the compute dtype."""
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
        # All or nothing: the new weight is built and every other entry checked before anything is assigned. A
        # problem goes to error_msgs, on which load_state_dict raises whatever ``strict`` says (as it does for
        # nn.Linear's size mismatches), and the layer stays as it was.
        weight_key = prefix + "weight"
        stats_prefix = weight_key + "."
        rest = {key: value for key, value in state_dict.items() if key != weight_key}
        stats = {key[len(stats_prefix) :]: rest.pop(key) for key in list(rest) if key.startswith(stats_prefix)}
        own = {prefix + name: tensor for name, tensor in self._own_tensors().items() if prefix + name in rest}
        weight, problems = None, []
        if weight_key in state_dict:
            try:
                weight, unknown = self._checkpoint_weight(state_dict[weight_key], stats, weight_key)
                unexpected_keys.extend(f"{stats_prefix}{key}" for key in unknown)
            except Exception as error:  # noqa: BLE001 - whatever a checkpoint holds is reported, not half loaded
                problems.append(f"{weight_key}: {error}")
        problems += [problem for key, tensor in own.items() if (problem := _entry_problem(key, rest[key], tensor))]
        if problems:
            error_msgs.extend(problems)
            rest = {key: value for key, value in rest.items() if key not in own}  # copy none of them
        saved = {key: (tensor, tensor.detach().clone()) for key, tensor in own.items() if not problems}
        n_errors = len(error_msgs)
        # torch loads lora_A, lora_B and bias, and keeps its account of missing and unexpected keys
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[:] = [key for key in missing_keys if key not in state_dict]  # the weight, and entries not copied
        if len(error_msgs) > n_errors:
            # a copy failed in a way the checks above cannot foresee (a meta tensor): undo the copies made
            with torch.no_grad():
                for key, (tensor, value) in saved.items():
                    setattr(self, key[len(prefix) :], tensor)  # assign=True replaces the Parameter itself
                    tensor.copy_(value)
        elif weight is not None and not problems:
            self.weight = weight

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters and persistent buffers torch's load handles itself: all but the 4-bit weight."""
        persistent = {name: b for name, b in self._buffers.items() if name not in self._non_persistent_buffers_set}
        tensors = {**self._parameters, **persistent}
        return {name: tensor for name, tensor in tensors.items() if tensor is not None and name != "weight"}

    def _checkpoint_weight(self, data: Any, stats: dict[str, Any], key: str) -> tuple[Any, list[str]]:
        """The layer's new frozen ``Params4bit`` from a checkpoint's ``weight`` and its statistics (``weight.*``,
        prefix stripped), and the statistics' names bitsandbytes does not know; raises naming the problem.

        A dense weight without statistics (nn.Linear's state dict) is quantized in the layer's own format.
        """
        from bitsandbytes.nn import Params4bit

        shape = [self.out_features, self.in_features]
        if not torch.overrides.is_tensor_like(data):
            raise TypeError(f"expected a tensor from the checkpoint, got {type(data).__name__}")
        if not stats:
            packed_size = (self.out_features * self.in_features + 1) // 2
            looks_packed = data.numel() * data.element_size() == packed_size and list(data.shape) != shape
            if not data.dtype.is_floating_point or looks_packed:
                raise ValueError(
                    f"4-bit weight without its quantization statistics ({key}.absmax, {key}.quant_map, "
                    f"{key}.quant_state.bitsandbytes__{self.weight.quant_state.quant_type}, ...)"
                )
            if list(data.shape) != shape:
                raise ValueError(
                    f"size mismatch: the checkpoint's dense weight is {list(data.shape)}, the layer is {shape}"
                )
            return self._quantize_like_weight(data), []
        missing, unknown = check_quant_stats(stats, self.weight.quant_state.quant_type)
        if missing:
            names = ", ".join(f"{key}.{name}" for name in missing)
            raise ValueError(f"4-bit weight without its quantization statistics: missing {names}")
        known = {name: value for name, value in stats.items() if name not in unknown}
        device = packed_bytes(self.weight).device
        weight = Params4bit.from_prequantized(data, known, requires_grad=False, device=device)
        logical = list(weight.quant_state.shape or ())
        if data.dim() == 2 and list(data.shape) == logical and data.shape[1] > 1:
            raise ValueError(
                f"a dense {logical} weight together with 4-bit quantization statistics: a checkpoint holds either the "
                "packed 4-bit weight with its statistics or a dense weight alone"
            )
        n_k = list(weight_shape(weight, weight.quant_state))  # also checks the packed dtype, byte count, statistics
        if n_k != shape:
            raise ValueError(f"size mismatch: the checkpoint's 4-bit weight is {n_k}, the layer is {shape}")
        return weight, unknown

    def _quantize_like_weight(self, dense: torch.Tensor) -> Any:
        """``dense`` quantized as the layer's weight is: quant type, blocksize, nesting, dtype, storage, device."""
        state = self.weight.quant_state
        if is_cpu_packed(state):  # bitsandbytes' CPU repacking keeps the original format aside
            nested, dtype = state.original_nested, state.original_dtype
            storage = getattr(state, "original_storage_type", torch.uint8)
        else:
            nested, dtype, storage = state.nested, state.dtype, self.weight.dtype
        # copied into the layer's dense dtype first, as nn.Linear's load_state_dict would, then quantized
        return quantize_weight(
            dense.detach().to(dtype), state.quant_type, state.blocksize, nested, storage,
            device=packed_bytes(self.weight).device,
        )  # fmt: skip


def _entry_problem(key: str, value: Any, tensor: torch.Tensor) -> Optional[str]:
    """What torch's load would reject for a parameter or buffer (its messages), checked before anything is copied."""
    if not torch.overrides.is_tensor_like(value):
        return (
            f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like object from checkpoint '
            f"but received {type(value)}"
        )
    if value.shape != tensor.shape:
        return (
            f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, "
            f"the shape in current model is {tensor.shape}."
        )
    return None


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
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(dense.weight, dense.bias, r, lora_alpha, lora_dropout, lora_dtype, use_rslora, adapter_name)

    def _setup(
        self, weight, bias, r, lora_alpha, lora_dropout, lora_dtype, use_rslora=False, adapter_name="default"
    ) -> None:
        out_features, in_features = weight.shape
        self.weight = _frozen(weight)
        self.bias = _frozen(bias)
        self._init_lora(
            in_features, out_features, r, lora_alpha, lora_dropout, weight.device, lora_dtype, use_rslora, adapter_name
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        *,
        lora_dtype: torch.dtype = torch.float32,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> "LoRALinear":
        """Add a LoRA adapter to ``linear``, sharing (and freezing) its weight and bias."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, r, lora_alpha, lora_dropout, lora_dtype, use_rslora, adapter_name)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_floating_input(x)
        if self.lora_A is None:  # no adapter active on this layer
            return _base_linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        y = F.lora_linear(
            x.to(self.weight.dtype), self.weight, self.lora_A, self.lora_B, self.scaling,
            bias=self.bias, dropout_p=self.lora_dropout, training=self.training,
        )  # fmt: skip
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """An nn.Linear holding ``W + scaling·B·A`` (the active adapter; and the bias) in the weight's dtype."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
            dtype=self.weight.dtype,
        )  # fmt: skip
        linear.weight.copy_(self.weight.float() + self._lora_delta())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

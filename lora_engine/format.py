"""bitsandbytes' 4-bit weight format, read in place.

A ``bitsandbytes.nn.Params4bit`` holds W[N, K] as ``ceil(N*K/2)`` packed bytes (row-major flattening, two
codes per byte, high nibble first; any ``quant_storage`` dtype is reinterpreted as bytes), and its
``quant_state`` holds the 16-entry code table (NF4 or FP4), one absmax per ``blocksize`` consecutive flat
elements (blocks may straddle rows), and, with double quantization, the absmax as uint8 codes into
``state2.code`` scaled by ``state2.absmax[b // state2.blocksize]`` plus ``offset``. Nothing is copied or
converted: the kernels read these tensors directly.

On CPUs with AVX512-BF16, bitsandbytes repacks a weight in place the first time an eval-mode layer runs
(``quant_state.packing_format_for_cpu``). The reference path reads that layout; the Triton kernels do not
and say so.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from .kernels.operands import Packed4bit

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # every blocksize bitsandbytes accepts
CPU_PACKED_ROWS = 32  # rows interleaved per group by bitsandbytes' CPU packing


_CPU_PACKED_FLAG = "packing_format_for_cpu"  # what bitsandbytes sets on a quant state it repacked


def is_cpu_packed(quant_state: Any) -> bool:
    """True when bitsandbytes repacked the weight for its AVX512 CPU kernel."""
    # What getattr finds (the instance's attribute, else the class's) without the miss going through QuantState's
    # __getattr__, which raises an AttributeError (µs per call): bitsandbytes sets the flag on repacking only.
    flag = getattr(quant_state, "__dict__", {}).get(_CPU_PACKED_FLAG)
    return bool(flag if flag is not None else getattr(type(quant_state), _CPU_PACKED_FLAG, False))


def weight_shape(weight: torch.Tensor, quant_state: Any) -> tuple[int, int]:
    """Validate a bitsandbytes 4-bit weight and its quant state; return the logical (N, K).

    Raises ValueError/TypeError naming the problem for anything the kernels cannot read.
    """
    if quant_state is None:
        raise ValueError(
            "4-bit weight has no quant_state: it is not a quantized bitsandbytes Params4bit "
            "(bitsandbytes quantizes when the layer is moved to a device, e.g. .to('cuda'))"
        )
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unsupported 4-bit quant_type {quant_type!r}; supported: {', '.join(QUANT_TYPES)}")
    blocksize = getattr(quant_state, "blocksize", None)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}; bitsandbytes blocksizes are {BLOCKSIZES}")
    shape = tuple(getattr(quant_state, "shape", ()) or ())
    if len(shape) != 2:
        raise ValueError(f"4-bit weight must be a 2-D matrix [out_features, in_features], quant_state.shape={shape}")
    n, k = int(shape[0]), int(shape[1])
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"4-bit weight must be a tensor, got {type(weight).__name__}")
    if weight.dtype.is_floating_point and weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported 4-bit quant_storage dtype {weight.dtype}")
    if is_cpu_packed(quant_state):
        return n, k
    expected = (n * k + 1) // 2
    have = weight.numel() * weight.element_size()
    if have != expected:
        raise ValueError(
            f"4-bit weight holds {have} bytes but a [{n}, {k}] matrix packs into {expected}: "
            "the weight does not match its quant_state"
        )
    blocks = -(-n * k // blocksize)
    absmax = quant_state.absmax
    if absmax.numel() != blocks:
        raise ValueError(
            f"quant_state.absmax has {absmax.numel()} entries, expected {blocks} for [{n}, {k}] / {blocksize}"
        )
    if quant_state.code.numel() != 16:
        raise ValueError(f"quant_state.code must have 16 entries, has {quant_state.code.numel()}")
    if getattr(quant_state, "nested", False):
        if absmax.dtype != torch.uint8:
            raise TypeError(f"nested absmax must be uint8 codes, got {absmax.dtype}")
        state2 = quant_state.state2
        if state2.absmax.numel() != -(-blocks // state2.blocksize):
            raise ValueError("quant_state.state2.absmax does not cover the absmax codes")
    elif not absmax.dtype.is_floating_point:
        raise TypeError(f"absmax must be floating point when not nested, got {absmax.dtype}")
    return n, k


PACKED_STATS_KEY = "quant_state.bitsandbytes__"  # + quant type: the JSON-packed non-tensor entries of a quant state
_STATS_TENSORS = ("absmax", "quant_map")
_STATS_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_TENSORS = ("nested_absmax", "nested_quant_map")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")


def check_quant_stats(stats: Mapping[str, Any], quant_type: str = "nf4") -> tuple[list[str], list[str]]:
    """The entries a 4-bit weight's statistics lack, and those bitsandbytes does not know: ``(missing, unknown)``.

    ``stats`` is the ``weight.*`` part of a state dict with the ``weight.`` prefix stripped, as bitsandbytes'
    ``QuantState.as_dict(packed=True)`` writes it (``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``,
    ``quant_state.bitsandbytes__nf4``) or unpacked (``quant_type``, ``blocksize``, ... as entries of their own).
    A missing packed entry is named for ``quant_type``. Raises ValueError for a packed entry that does not decode.
    """
    from bitsandbytes.functional import QuantState
    from bitsandbytes.utils import unpack_tensor_to_dict

    packed_keys = {PACKED_STATS_KEY + name for name in QUANT_TYPES}
    unknown = [key for key in stats if key not in packed_keys and key not in QuantState.valid_qs_keys]
    fields = {key: value for key, value in stats.items() if key in QuantState.valid_qs_keys}
    packed = [key for key in stats if key in packed_keys]
    if len(packed) > 1:
        raise ValueError(f"the statistics hold several packed quant states: {', '.join(packed)}")
    if packed:
        try:
            fields.update(unpack_tensor_to_dict(stats[packed[0]]))
        except Exception as error:  # a checkpoint may hold any bytes there
            raise ValueError(f"{packed[0]} does not decode to a bitsandbytes quant state: {error}") from error
    has_fields = bool(packed) or "quant_type" in fields  # else the packed entry holding them is missing
    nested = any(key.startswith("nested_") for key in fields)
    required = _STATS_TENSORS + (_NESTED_TENSORS if nested else ())
    if has_fields:
        required += _STATS_FIELDS + (_NESTED_FIELDS if nested else ())
    missing = [key for key in required if key not in fields]
    if not has_fields:
        missing.append(PACKED_STATS_KEY + quant_type)
    return missing, unknown


def packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat contiguous uint8 tensor (any quant_storage dtype is reinterpreted, not converted):
    a view of the weight, or a copy of a weight whose bytes are not contiguous (the kernels read them in order)."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    data = data.reshape(-1)
    if not data.is_contiguous():  # a strided 1-D weight: reshape keeps its strides
        data = data.contiguous()
    return data if data.dtype == torch.uint8 else data.view(torch.uint8)


def _offset_tensor(quant_state: Any, device: torch.device) -> torch.Tensor:
    offset = quant_state.offset
    if isinstance(offset, torch.Tensor):
        return offset.reshape(1).to(device=device, dtype=torch.float32)
    return torch.tensor([float(offset)], dtype=torch.float32, device=device)


def packed_4bit(weight: torch.Tensor, quant_state: Any) -> Packed4bit:
    """The kernels' view of a bitsandbytes 4-bit weight; validates layout and devices."""
    n, k = weight_shape(weight, quant_state)
    if is_cpu_packed(quant_state):
        raise ValueError(
            "this 4-bit weight was repacked by bitsandbytes for its CPU kernel (packing_format_for_cpu); the Triton "
            "kernels read bitsandbytes' standard layout. Move the layer to the GPU (bitsandbytes restores the layout "
            "on .cuda()) or use lora_engine.set_backend('torch')"
        )
    data = packed_bytes(weight)
    device = data.device
    code = quant_state.code.to(device=device, dtype=torch.float32)
    if getattr(quant_state, "nested", False):
        state2 = quant_state.state2
        _check_device(device, quant_state.absmax, state2.absmax, state2.code)
        return Packed4bit(
            data=data,
            code=code,
            absmax=quant_state.absmax.reshape(-1),
            absmax2=state2.absmax.reshape(-1).to(torch.float32),
            code2=state2.code.to(torch.float32),
            offset=_offset_tensor(quant_state, device),
            n=n,
            k=k,
            blocksize=quant_state.blocksize,
            blocksize2=state2.blocksize,
        )
    _check_device(device, quant_state.absmax)
    return Packed4bit(data, code, quant_state.absmax.reshape(-1), None, None, None, n, k, quant_state.blocksize, 0)


class _ByIdentity:
    """Values keyed by an object's identity, each dropped when its object is collected (bitsandbytes' QuantState is
    unhashable). ``torch.utils.weak.WeakIdKeyDictionary`` does the same with a weak reference object built per
    lookup; this one looks up by ``id()`` and checks the stored reference, a dict lookup per call."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, obj: Any) -> Any:
        """The value stored for ``obj`` itself (not for an earlier object that had its id), or None."""
        entry = self._entries.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else None

    def __setitem__(self, obj: Any, value: Any) -> None:
        key, entries = id(obj), self._entries

        def drop(ref: weakref.ref) -> None:  # obj was collected: forget its entry, unless a newer object took the id
            if entries.get(key, (None,))[0] is ref:
                entries.pop(key, None)

        entries[key] = (weakref.ref(obj, drop), value)

    def __len__(self) -> int:
        return len(self._entries)


# quant state (by identity) -> (what the operands were built from, operands)
_packed_cache = _ByIdentity()


def _built_from(weight: torch.Tensor, quant_state: Any) -> tuple:
    """Where the packed bytes and statistics live, and the sizes of the format: the operands stay valid while this
    does. (The cached operands keep the old tensors alive, so a replaced tensor cannot reappear at the same address.)
    ``weight`` is contiguous: its own address and size are those of :func:`packed_bytes`' flat view.
    """
    state2 = quant_state.state2 if getattr(quant_state, "nested", False) else None
    offset = getattr(quant_state, "offset", None)
    return (
        weight.device,
        weight.data_ptr(),
        weight.nbytes,
        quant_state.absmax.data_ptr(),
        quant_state.code.data_ptr(),
        None if state2 is None else (state2.absmax.data_ptr(), state2.code.data_ptr(), state2.blocksize),
        offset.data_ptr() if isinstance(offset, torch.Tensor) else offset,
        tuple(quant_state.shape),
        quant_state.blocksize,
        quant_state.quant_type,
    )  # bitsandbytes' CPU repacking rewrites the bytes: a new address, so a rebuild that refuses the layout


def packed_4bit_cached(weight: torch.Tensor, quant_state: Any) -> Packed4bit:
    """``packed_4bit``, validated and built once per weight (keyed by the quant state's identity) and rebuilt when its
    bytes or statistics are replaced (``load_state_dict``, ``.to()``, a new ``Params4bit`` or quant state: see
    :func:`_built_from`). A non-contiguous weight is read through a copy (:func:`packed_bytes`) made anew by every
    build: built per call, never cached. Cheapest with bitsandbytes' ``__torch_function__`` disabled around it
    (``torch._C.DisableTorchFunctionSubclass()``)."""
    if quant_state is None or not weight.is_contiguous():
        return packed_4bit(weight, quant_state)  # no quant state: raises, naming the problem
    built_from = _built_from(weight, quant_state)
    cached = _packed_cache.get(quant_state)
    if cached is not None and cached[0] == built_from:
        return cached[1]
    packed = packed_4bit(weight, quant_state)
    _packed_cache[quant_state] = (built_from, packed)
    return packed


# storage of the weight's bytes (weakly) -> {where the bytes lie in it: (what the norms were read from, the
# statistics tensors, the norms)}. A storage may hold several weights (views into one buffer), hence the inner dict.
_row_norm_cache = _ByIdentity()


def row_norms_sq_cached(weight: Union[Packed4bit, torch.Tensor]) -> torch.Tensor:
    """fp32 [N]: ‖W‖² of each row of a frozen weight, 4-bit (``Packed4bit``: of its decode) or dense [N, K], computed
    once per weight and again when its bytes or statistics are replaced. The one dense fp32 copy happens here, once.

    Keyed by the storage of the weight's bytes, not a quant state: the compiled graph's op
    (``custom_ops.row_norms_sq``) sees only the weight's tensors, and shares this cache with eager calls. While the
    storage lives its memory holds these bytes; the entry keeps the statistics tensors alive, so a replaced one
    cannot reappear at the same address. Returns the cached tensor itself: do not write into it.
    """
    if isinstance(weight, Packed4bit):
        data = weight.data
        stats = tuple(t for t in (weight.code, weight.absmax, weight.absmax2, weight.code2, weight.offset)
                      if t is not None)  # fmt: skip
        layout = (weight.n, weight.k, weight.blocksize, weight.blocksize2)
    else:
        data, stats, layout = weight, (), (weight.dtype, tuple(weight.shape), weight.stride())
    where = (data.data_ptr(), data.numel())
    # the version counters catch bytes or statistics rewritten in place (``copy_``) at the same addresses
    built_from = (data._version, tuple((t.data_ptr(), t._version) for t in stats), layout)
    storage = data.untyped_storage()
    entries = _row_norm_cache.get(storage)
    if entries is None:
        entries = _row_norm_cache[storage] = {}
    cached = entries.get(where)
    if cached is not None and cached[0] == built_from:
        return cached[2]
    # a storage resized in place (FSDP2 frees and refills its gathered buffer) moves its bytes: forget the entries
    # of the old addresses (over a copy of the keys, popped: another thread may change the dict meanwhile)
    start = storage.data_ptr()
    for stale in [key for key in list(entries) if not start <= key[0] < start + storage.nbytes()]:
        entries.pop(stale, None)
    if isinstance(weight, Packed4bit):
        from .kernels.dequantize import dequantize_4bit

        dense = dequantize_4bit(weight, torch.float32)
    else:
        dense = weight.detach().float()
    norms = dense.square().sum(1)
    entries[where] = (built_from, stats, norms)
    return norms


def _check_device(device: torch.device, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device != device:
            raise ValueError(f"quant_state tensors are on {t.device} but the packed weight is on {device}")


def unpack_cpu_packed(weight: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N, K] (int64) and per-block absmax [N, K // blocksize] (fp32) of a CPU-repacked weight.

    bitsandbytes' CPU packing stores, for each group of 32 rows and each pair of columns, 64 codes as 32 bytes:
    low nibbles hold rows 0-15 of the group, high nibbles rows 16-31, two columns per row side by side.
    The absmax is already decoded (bf16, transposed to [K // blocksize, N]).
    """
    n, k = (int(s) for s in quant_state.shape)
    rows = CPU_PACKED_ROWS
    packed = packed_bytes(weight).reshape(n // rows, k // 2, rows).to(torch.int64)
    codes = torch.cat([packed & 15, packed >> 4], dim=-1)  # [N/32, K/2, 64]: 32 rows x 2 columns
    codes = codes.reshape(n // rows, k // 2, rows, 2).permute(0, 2, 1, 3).reshape(n, k)
    absmax = quant_state.absmax.t().to(torch.float32)
    return codes, absmax


def quantize_weight(
    dense: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    device: Optional[torch.device] = None,
):
    """Quantize a dense [N, K] weight through bitsandbytes; returns a ``bitsandbytes.nn.Params4bit``."""
    import bitsandbytes as bnb

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unsupported quant_type {quant_type!r}; supported: {', '.join(QUANT_TYPES)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}; bitsandbytes blocksizes are {BLOCKSIZES}")
    if dense.dim() != 2:
        raise ValueError(f"weight to quantize must be 2-D, got shape {tuple(dense.shape)}")
    if dense.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"weight to quantize must be fp16, bf16 or fp32, got {dense.dtype}")
    device = torch.device(device) if device is not None else dense.device
    param = bnb.nn.Params4bit(
        dense.detach().contiguous(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
    )
    return param.to(device)  # bitsandbytes quantizes on the first move to a device

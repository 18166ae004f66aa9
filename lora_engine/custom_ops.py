"""The fused adapted linear as ``torch.library`` custom ops, so ``torch.compile`` captures it without graph breaks.

    lora_engine::lora_linear_fwd     (x, A, B, bias, W, ...) -> (y, left)        left = drop(x)·Aᵀ, kept for dB
    lora_engine::lora_linear_bwd     (dy, x, A, B, left, bias, W, ...) -> (dx, dA, dB, dbias)
    lora_engine::adapter_linear_fwd  (kind, x, trainables, constants, bias, W, options, seed, ...) -> (y, saved)
    lora_engine::adapter_linear_bwd  (kind, dy, x, trainables, constants, bias, saved, W, ...) -> [dx, dbias, *grads]
    lora_engine::row_norms_sq        (W) -> ‖W‖² per row                      DoRA's constant, once per weight
    lora_engine::linear_4bit_fwd     (x, bias, W, path) -> y                   a 4-bit layer without an adapter
    lora_engine::linear_4bit_dx      (dy, W, path) -> dx                       (its dbias = Σ dy is traced as is)
    lora_engine::multi_lora_linear_fwd  (x, base, bias, W, As, Bs, scalings, idx, path) -> (y, left)  mixed batch
    lora_engine::multi_lora_linear_bwd  (dy, x, left, bias, W, As, Bs, ...) -> [dx, dbias, *dAs, *dBs]   its backward

The adapter ops serve IA3, DoRA and LowRank (``_OP_KINDS``, one entry per kind): the kind travels as its name, its
trainable tensors as a list, its tensors that get no gradient (DoRA's ‖W‖²) as another, its other settings as a list
of numbers, and its dropout as a probability and a seed tensor. The forward also returns what the kind's backward
reads beyond its inputs (DoRA: drop(x)·Aᵀ, the row scale g and the norm), each kept only when a gradient that
reads it is wanted (an empty placeholder otherwise), as LoRA's op keeps ``left`` only for dB. So a new kind adds
one table entry, not a schema. LoRA keeps its own pair.

The ops run exactly the code of ``autograd.AdapterLinearFunction`` (the forward and backward of each kind in
``autograd.KINDS``) and of ``autograd.Linear4bitFunction`` (``linear_forward``, ``linear_backward_input``), so
eager and compiled training share one implementation. The ops take only tensors and plain numbers: a 4-bit W
travels as its ``Packed4bit`` tensors plus ``[n, k, blocksize, blocksize2]``, a dense W as one tensor plus
``[n, k, 0, 0]``. The dropout seed is a tensor input drawn by the caller
(``seed_tensor``): drawing it inside the op would hide randomness from the compiler, and reading it on the
host (``.item()``) while tracing would break the graph. Fake implementations give shapes and dtypes to the
compiler; the real ones launch the Triton kernels (on CUDA, or in the interpreter under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from . import dispatch, reference
from .kernels.operands import Dropout, Packed4bit
from .kinds import IA3, Adapter, Dora, Lora, LowRank, MultiLora

Weight = Union[Packed4bit, torch.Tensor]
_EMPTY = (0,)  # shape of the placeholder returned for a gradient or buffer nobody asked for


def weight_parts(weight: Weight) -> tuple[list[torch.Tensor], list[int]]:
    """Split a 4-bit or dense weight into the tensors and sizes the ops take."""
    if isinstance(weight, Packed4bit):
        tensors = [weight.data, weight.code, weight.absmax]
        if weight.nested:
            tensors += [weight.absmax2, weight.code2, weight.offset]
        return tensors, [weight.n, weight.k, weight.blocksize, weight.blocksize2]
    # never an empty list: the op's autograd wrapper would take an empty int list for an empty tensor list
    return [weight], [*weight.shape, 0, 0]


def _weight(tensors: list[torch.Tensor], sizes: list[int]) -> Weight:
    """Inverse of :func:`weight_parts`."""
    if sizes[2] == 0:  # blocksize 0: a dense weight
        return tensors[0]
    data, code, absmax, *nested = tensors
    absmax2, code2, offset = nested if nested else (None, None, None)
    n, k, blocksize, blocksize2 = sizes
    return Packed4bit(data, code, absmax, absmax2, code2, offset, n, k, blocksize, blocksize2)


def _dropout(dropout_p: float, seed: Optional[torch.Tensor], row_length: int) -> Optional[Dropout]:
    if seed is None or dropout_p <= 0:
        return None
    return Dropout(int(seed.reshape(-1)[0].item()), float(dropout_p), row_length)


def seed_tensor(dropout_seed: Optional[int]) -> torch.Tensor:
    """The dropout seed as a 1-element int64 CPU tensor: ``dropout_seed`` or a draw from torch's CPU generator.

    The draw is the one ``reference.draw_dropout_seed`` makes, without reading it back to Python.
    """
    if dropout_seed is not None:
        return torch.tensor([int(dropout_seed)], dtype=torch.int64)
    return reference.draw_dropout_seed_tensor()


@torch.library.custom_op("lora_engine::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: list[torch.Tensor],
    weight_sizes: list[int],
    scaling: float,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    path: str,
    keep_left: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias`` on 2-D x; also returns ``left`` (fp32 [M, r]) when ``keep_left``."""
    from .autograd import lora_forward  # imports Triton, which only the real implementation needs
    from .kernels import runtime

    runtime.load_kernels()
    dropout = _dropout(dropout_p, dropout_seed, x.shape[1])
    with dispatch.device_guard(x.device):
        y, left = lora_forward(
            x, lora_A, lora_B, bias, _weight(weight, weight_sizes), scaling, dropout, path, keep_left
        )
    if not keep_left or left is None:
        left = x.new_empty(_EMPTY, dtype=torch.float32)
    return y, left


@lora_linear_fwd.register_fake
def _(x, lora_A, lora_B, bias, weight, weight_sizes, scaling, dropout_p, dropout_seed, path, keep_left):
    m, rank = x.shape[0], lora_A.shape[0]
    left_shape = (m, rank) if keep_left else _EMPTY
    return x.new_empty((m, lora_B.shape[0])), x.new_empty(left_shape, dtype=torch.float32)


@torch.library.custom_op("lora_engine::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    left: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: list[torch.Tensor],
    weight_sizes: list[int],
    scaling: float,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    path: str,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB, dbias)``; a gradient not in ``needs_grad`` comes back as an empty placeholder."""
    from .autograd import adapter_backward

    adapter = Lora(lora_A, lora_B, scaling, _dropout(dropout_p, dropout_seed, x.shape[1]))
    need_x, need_A, need_B, need_bias = needs_grad
    with dispatch.device_guard(dy.device):
        if need_B and left.shape != (x.shape[0], lora_A.shape[0]):
            # the forward did not keep drop(x)·Aᵀ (lora_B needed no gradient then): one low-rank pass redoes it
            from .kernels.lora_lowrank import lora_down

            left = lora_down(x, lora_A.t(), adapter.dropout)
        saved = (left if need_B else None,)
        dx, (d_lora_A, d_lora_B), d_bias = adapter_backward(
            adapter, dy, x, bias, saved, _weight(weight, weight_sizes), path, need_x, (need_A, need_B), need_bias
        )
    return tuple(g if g is not None else dy.new_empty(_EMPTY) for g in (dx, d_lora_A, d_lora_B, d_bias))


@lora_linear_bwd.register_fake
def _(dy, x, lora_A, lora_B, left, bias, weight, weight_sizes, scaling, dropout_p, dropout_seed, path, needs_grad):
    like = (x, lora_A, lora_B, bias)
    return tuple(
        t.new_empty(t.shape) if need and t is not None else dy.new_empty(_EMPTY) for t, need in zip(like, needs_grad)
    )


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, lora_A, lora_B, bias, weight, weight_sizes, scaling, dropout_p, dropout_seed, path, _ = inputs
    ctx.save_for_backward(x, lora_A, lora_B, output[1], bias, dropout_seed, *weight)
    ctx.weight_sizes, ctx.scaling, ctx.dropout_p, ctx.path = weight_sizes, scaling, dropout_p, path


def _backward(ctx: Any, dy: torch.Tensor, _dleft: Optional[torch.Tensor]) -> tuple:
    x, lora_A, lora_B, left, bias, dropout_seed, *weight = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    needs[3] = needs[3] and bias is not None
    grads = lora_linear_bwd(
        dy, x, lora_A, lora_B, left, bias, weight, ctx.weight_sizes, ctx.scaling, ctx.dropout_p, dropout_seed,
        ctx.path, needs,
    )  # fmt: skip
    dx, d_lora_A, d_lora_B, d_bias = (g if need else None for g, need in zip(grads, needs))
    # one entry per input, with a list of Nones for the list of weight tensors
    return dx, d_lora_A, d_lora_B, d_bias, [None] * len(weight), None, None, None, None, None, None


torch.library.register_autograd("lora_engine::lora_linear_fwd", _backward, setup_context=_setup_context)


def lora_linear(
    x: torch.Tensor,
    weight: Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    dropout_seed: Optional[int],
    path: str,
) -> torch.Tensor:
    """The fused layer on 2-D x through the custom ops (what ``functional`` runs under ``torch.compile``).

    ``dropout_p`` > 0 means dropout is on (the caller passes 0 outside training).
    """
    seed = seed_tensor(dropout_seed) if dropout_p > 0 else None
    tensors, sizes = weight_parts(weight)
    keep_left = torch.is_grad_enabled() and lora_B.requires_grad
    y, _ = lora_linear_fwd(
        x, lora_A, lora_B, bias, tensors, sizes, float(scaling), float(dropout_p), seed, path, keep_left
    )
    return y


class _OpKind(NamedTuple):
    """How the adapter ops carry one kind: its bundle as lists of tensors and numbers, and its saved tensors.

    build(trainables, constants, options, dropout) -> the bundle (``dropout``: a ``Dropout`` or None).
    parts(bundle) -> (constants, options): its tensors that get no gradient, and its numbers.
    saved(m, n, trainables, needs) -> one entry per tensor of the kind's ``saved`` (``autograd.KINDS``): its shape
        (fp32) when the backward of the trainable gradients ``needs`` (and of dx, dbias) reads it, else None (the
        op returns an empty placeholder instead). A tensor kept for some ``needs`` is kept for any superset.
    """

    bundle: type
    build: Callable[[list[torch.Tensor], list[torch.Tensor], list[float], Optional[Dropout]], Adapter]
    parts: Callable[[Any], tuple[list[torch.Tensor], list[float]]]
    saved: Callable[[Any, int, list[torch.Tensor], list[bool]], list[Optional[tuple]]]


def _ia3(trainables: list[torch.Tensor], constants: list[torch.Tensor], options: list[float], dropout) -> IA3:
    if dropout is not None:
        raise ValueError("IA3 has no dropout")
    return IA3(trainables[0], bool(options[0]))


def _dora(trainables: list[torch.Tensor], constants: list[torch.Tensor], options: list[float], dropout) -> Dora:
    lora_A, lora_B, magnitude = trainables
    return Dora(lora_A, lora_B, magnitude, options[0], constants[0], dropout)


def _dora_parts(adapter: Dora) -> tuple[list[torch.Tensor], list[float]]:
    if adapter.dropout is not None:
        raise ValueError("the adapter ops take DoRA's dropout as dropout_p and a seed tensor, not in the bundle")
    return [adapter.base_norm_sq], [float(adapter.scaling)]


def _dora_saved(m: Any, n: int, trainables: list[torch.Tensor], needs: list[bool]) -> list[Optional[tuple]]:
    # (left = drop(x)·Aᵀ [M, r], g [N], ‖W + s·B·A‖ [N]): left feeds dB and dm, the norm dm, g every gradient
    _, need_B, need_m = needs
    return [(m, trainables[0].shape[0]) if need_B or need_m else None, (n,), (n,) if need_m else None]


def _lowrank(trainables: list[torch.Tensor], constants: list[torch.Tensor], options: list[float], dropout) -> LowRank:
    if dropout is not None:
        raise ValueError("LowRank has no dropout (the caller's left factor has it applied)")
    return LowRank(trainables[0], trainables[1], options[0])


# kind name -> how the adapter ops carry it (a new kind whose forward and backward live in autograd.KINDS adds an
# entry here, not a schema)
_OP_KINDS = {
    "ia3": _OpKind(IA3, _ia3, lambda a: ([], [float(a.scales_input)]), lambda m, n, trainables, needs: []),
    "dora": _OpKind(Dora, _dora, _dora_parts, _dora_saved),
    "lowrank": _OpKind(LowRank, _lowrank, lambda a: ([], [float(a.scaling)]), lambda m, n, trainables, needs: []),
}
_OP_KIND_NAMES = {spec.bundle: name for name, spec in _OP_KINDS.items()}


def _adapter(
    kind: str,
    trainables: list[torch.Tensor],
    constants: list[torch.Tensor],
    options: list[float],
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    row_length: int,
) -> Adapter:
    return _OP_KINDS[kind].build(trainables, constants, options, _dropout(dropout_p, dropout_seed, row_length))


@torch.library.custom_op("lora_engine::adapter_linear_fwd", mutates_args=())
def adapter_linear_fwd(
    kind: str,
    x: torch.Tensor,
    trainables: list[torch.Tensor],
    constants: list[torch.Tensor],
    bias: Optional[torch.Tensor],
    weight: list[torch.Tensor],
    weight_sizes: list[int],
    options: list[float],
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    path: str,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The adapted layer of ``kind`` on 2-D x (``autograd.KINDS``' forward): ``(y, saved)``, where ``saved`` holds
    the kind's saved tensors that the gradients of the trainables in ``needs_grad`` read, empty placeholders for
    the others (``_OpKind.saved``)."""
    from .autograd import KINDS
    from .kernels import runtime

    runtime.load_kernels()
    adapter = _adapter(kind, trainables, constants, options, dropout_p, dropout_seed, x.shape[1])
    with dispatch.device_guard(x.device):
        y, saved = KINDS[type(adapter)].forward(
            adapter, x, bias, _weight(weight, weight_sizes), path, tuple(needs_grad)
        )
    kept = _OP_KINDS[kind].saved(x.shape[0], weight_sizes[0], trainables, needs_grad)
    if len(saved) != len(kept) or any(t is None for t, shape in zip(saved, kept) if shape is not None):
        raise RuntimeError(f"the forward of adapter kind {kind!r} saved {len(saved)} tensors, not what _OP_KINDS says")
    return y, [t if shape is not None else x.new_empty(_EMPTY, dtype=torch.float32) for t, shape in zip(saved, kept)]


@adapter_linear_fwd.register_fake
def _(kind, x, trainables, constants, bias, weight, weight_sizes, options, dropout_p, dropout_seed, path, needs_grad):
    kept = _OP_KINDS[kind].saved(x.shape[0], weight_sizes[0], trainables, needs_grad)
    saved = [x.new_empty(shape if shape is not None else _EMPTY, dtype=torch.float32) for shape in kept]
    return x.new_empty((x.shape[0], weight_sizes[0])), saved


@torch.library.custom_op("lora_engine::adapter_linear_bwd", mutates_args=())
def adapter_linear_bwd(
    kind: str,
    dy: torch.Tensor,
    x: torch.Tensor,
    trainables: list[torch.Tensor],
    constants: list[torch.Tensor],
    bias: Optional[torch.Tensor],
    saved: list[torch.Tensor],
    weight: list[torch.Tensor],
    weight_sizes: list[int],
    options: list[float],
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    path: str,
    needs_grad: list[bool],
) -> list[torch.Tensor]:
    """``[dx, dbias, *trainable grads]`` (``autograd.KINDS``' backward) from the forward's ``saved``; what
    ``needs_grad`` leaves out is an empty placeholder. The dropout mask is redrawn from ``dropout_seed``."""
    from .autograd import adapter_backward

    adapter = _adapter(kind, trainables, constants, options, dropout_p, dropout_seed, x.shape[1])
    need_x, need_bias, *needs = needs_grad
    # a placeholder stands for a tensor these gradients do not read (the forward kept it for any that do)
    kept = _OP_KINDS[kind].saved(x.shape[0], weight_sizes[0], trainables, needs)
    saved = tuple(t if shape is not None else None for t, shape in zip(saved, kept))
    with dispatch.device_guard(dy.device):
        dx, grads, d_bias = adapter_backward(
            adapter, dy, x, bias, saved, _weight(weight, weight_sizes), path, need_x, tuple(needs), need_bias
        )
    return [g if g is not None else dy.new_empty(_EMPTY) for g in (dx, d_bias, *grads)]


@adapter_linear_bwd.register_fake
def _(kind, dy, x, trainables, constants, bias, saved, weight, weight_sizes, options, dropout_p, dropout_seed, path,
      needs_grad):  # fmt: skip
    like = (x, bias, *trainables)
    return [
        t.new_empty(t.shape) if need and t is not None else dy.new_empty(_EMPTY) for t, need in zip(like, needs_grad)
    ]


def _adapter_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    kind, x, trainables, constants, bias, weight, weight_sizes, options, dropout_p, dropout_seed, path, needs = inputs
    saved = output[1]
    ctx.save_for_backward(x, bias, dropout_seed, *trainables, *constants, *saved, *weight)
    ctx.counts = (len(trainables), len(constants), len(saved))
    ctx.kind, ctx.weight_sizes, ctx.options, ctx.dropout_p, ctx.path = kind, weight_sizes, options, dropout_p, path
    ctx.trainable_needs = needs


def _adapter_backward(ctx: Any, dy: torch.Tensor, _dsaved: Any) -> tuple:
    x, bias, dropout_seed, *rest = ctx.saved_tensors
    num_trainables, num_constants, num_saved = ctx.counts
    trainables, rest = rest[:num_trainables], rest[num_trainables:]
    constants, rest = rest[:num_constants], rest[num_constants:]
    saved, weight = rest[:num_saved], rest[num_saved:]
    need_x = bool(ctx.needs_input_grad[1])
    need_bias = bool(ctx.needs_input_grad[4]) and bias is not None
    # needs_input_grad has one flag for the whole list; the forward's flags say which of them want a gradient
    needs = [bool(ctx.needs_input_grad[2]) and bool(need) for need in ctx.trainable_needs]
    flags = [need_x, need_bias, *needs]
    grads = adapter_linear_bwd(
        ctx.kind, dy, x, trainables, constants, bias, saved, weight, ctx.weight_sizes, ctx.options, ctx.dropout_p,
        dropout_seed, ctx.path, flags,
    )  # fmt: skip
    dx, d_bias, *d_trainables = (g if need else None for g, need in zip(grads, flags))
    return (
        None, dx, d_trainables, [None] * num_constants, d_bias, [None] * len(weight), None, None, None, None, None,
        None,
    )  # fmt: skip


torch.library.register_autograd(
    "lora_engine::adapter_linear_fwd", _adapter_backward, setup_context=_adapter_setup_context
)


def adapter_linear(
    x: torch.Tensor,
    weight: Weight,
    adapter: Adapter,
    bias: Optional[torch.Tensor],
    path: str,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
) -> torch.Tensor:
    """The adapted layer on 2-D x through the adapter ops (what ``functional`` runs under ``torch.compile``).

    ``dropout_p`` > 0 means the adapter's dropout is on (the caller passes 0 outside training); its seed is
    ``dropout_seed`` or a draw from torch's CPU generator, as a tensor (``seed_tensor``).
    """
    name = _OP_KIND_NAMES[type(adapter)]
    constants, options = _OP_KINDS[name].parts(adapter)
    trainables = list(adapter.trainables())
    seed = seed_tensor(dropout_seed) if dropout_p > 0 else None
    # what the backward will need: saved tensors that only a gradient nobody wants reads are not kept
    needs = [torch.is_grad_enabled() and t.requires_grad for t in trainables]
    tensors, sizes = weight_parts(weight)
    y, _ = adapter_linear_fwd(
        name, x, trainables, constants, bias, tensors, sizes, options, float(dropout_p), seed, path, needs
    )
    return y


@torch.library.custom_op("lora_engine::row_norms_sq", mutates_args=())
def row_norms_sq_op(weight: list[torch.Tensor], weight_sizes: list[int]) -> torch.Tensor:
    """fp32 [N]: ‖W‖² of each row of a frozen 4-bit or dense W (DoRA's constant), computed once per weight
    (``format.row_norms_sq_cached``). Returns a copy: the compiled graph may reuse an op's output buffer."""
    from .format import row_norms_sq_cached
    from .kernels import runtime

    runtime.load_kernels()
    with dispatch.device_guard(weight[0].device):
        return row_norms_sq_cached(_weight(weight, weight_sizes)).clone()


@row_norms_sq_op.register_fake
def _(weight, weight_sizes):
    return weight[0].new_empty((weight_sizes[0],), dtype=torch.float32)


def row_norms_sq(weight: Weight) -> torch.Tensor:
    """:func:`format.row_norms_sq_cached` through the op (what ``functional``'s DoRA forwards run under
    ``torch.compile``: traced tensors have no address to look the cache up by)."""
    tensors, sizes = weight_parts(weight)
    return row_norms_sq_op(tensors, sizes)


@torch.library.custom_op("lora_engine::linear_4bit_fwd", mutates_args=())
def linear_4bit_fwd(
    x: torch.Tensor, bias: Optional[torch.Tensor], weight: list[torch.Tensor], weight_sizes: list[int], path: str
) -> torch.Tensor:
    """``y = x·Wᵀ + bias`` on 2-D x, W frozen (a 4-bit layer without an adapter)."""
    from .autograd import linear_forward
    from .kernels import runtime

    runtime.load_kernels()
    with dispatch.device_guard(x.device):
        return linear_forward(x, bias, _weight(weight, weight_sizes), path)


@linear_4bit_fwd.register_fake
def _(x, bias, weight, weight_sizes, path):
    return x.new_empty((x.shape[0], weight_sizes[0]))


@torch.library.custom_op("lora_engine::linear_4bit_dx", mutates_args=())
def linear_4bit_dx(dy: torch.Tensor, weight: list[torch.Tensor], weight_sizes: list[int], path: str) -> torch.Tensor:
    """``dx = dy·W`` for :func:`linear_4bit_fwd`."""
    from .autograd import linear_backward_input

    with dispatch.device_guard(dy.device):
        return linear_backward_input(dy, _weight(weight, weight_sizes), path)


@linear_4bit_dx.register_fake
def _(dy, weight, weight_sizes, path):
    return dy.new_empty((dy.shape[0], weight_sizes[1]))


def _setup_linear_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, bias, weight, weight_sizes, path = inputs
    ctx.save_for_backward(*weight)
    ctx.weight_sizes, ctx.path = weight_sizes, path
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx: Any, dy: torch.Tensor) -> tuple:
    weight = list(ctx.saved_tensors)
    dx = linear_4bit_dx(dy, weight, ctx.weight_sizes, ctx.path) if ctx.needs_input_grad[0] else None
    d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
    return dx, d_bias, [None] * len(weight), None, None


torch.library.register_autograd("lora_engine::linear_4bit_fwd", _linear_backward, setup_context=_setup_linear_context)


def linear_4bit(x: torch.Tensor, weight: Packed4bit, bias: Optional[torch.Tensor], path: str) -> torch.Tensor:
    """The 4-bit layer without an adapter on 2-D x through the custom ops (``functional.linear_4bit`` under
    ``torch.compile``)."""
    tensors, sizes = weight_parts(weight)
    return linear_4bit_fwd(x, bias, tensors, sizes, path)


# The mixed batch (``kinds.MultiLora``): row m of x through LoRA adapter indices[m], -1 the base alone. The ops run
# the code of ``autograd.MultiLoraFunction`` (``multi_lora_forward`` / ``multi_lora_add_`` and
# ``multi_lora_backward``). The factors travel as two tensor lists, the scalings as a list of floats and the indices
# as an int64 tensor on x's device; the rows are grouped by adapter inside the ops (``segment_metadata``), so the
# compiled graph holds no data-dependent shape. The backward builds the stacked factors and the grouping again
# (small: n·r_max·(in + out) elements and a few M-sized operations) rather than take them as hidden outputs.


def _multi_lora(
    lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], scalings: list[float], indices: torch.Tensor
) -> MultiLora:
    return MultiLora(tuple(lora_As), tuple(lora_Bs), tuple(float(s) for s in scalings), indices)


@torch.library.custom_op("lora_engine::multi_lora_linear_fwd", mutates_args=())
def multi_lora_linear_fwd(
    x: torch.Tensor,
    base: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    weight: list[torch.Tensor],
    weight_sizes: list[int],
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scalings: list[float],
    indices: torch.Tensor,
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, left)`` of a mixed batch on 2-D x (``autograd.multi_lora_forward``), ``left`` fp32 [M, r_max] for the
    backward. ``indices``: int64 [M] on x's device, already range-checked. With ``base`` (the caller's base output
    ``x·Wᵀ + bias``, then ``bias`` is None) the low-rank terms are added to a copy of it (no gradient then)."""
    from .autograd import multi_lora_add_, multi_lora_forward
    from .kernels import runtime

    runtime.load_kernels()
    adapter = _multi_lora(lora_As, lora_Bs, scalings, indices)
    with dispatch.device_guard(x.device):
        if base is None:
            y, left, _ = multi_lora_forward(adapter, x, bias, _weight(weight, weight_sizes), path)
        else:
            if bias is not None:
                raise ValueError("multi_lora_linear_fwd: a base output already holds the bias; pass bias=None")
            # a copy: an op's output may not alias its input (contiguous, as the fake implementation says)
            y, left, _ = multi_lora_add_(adapter, x, base.clone(memory_format=torch.contiguous_format))
    return y, left


@multi_lora_linear_fwd.register_fake
def _(x, base, bias, weight, weight_sizes, lora_As, lora_Bs, scalings, indices, path):
    m, r_max = x.shape[0], max(lora_A.shape[0] for lora_A in lora_As)
    y = x.new_empty((m, weight_sizes[0])) if base is None else base.new_empty(base.shape)
    return y, x.new_empty((m, r_max), dtype=torch.float32)


@torch.library.custom_op("lora_engine::multi_lora_linear_bwd", mutates_args=())
def multi_lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    left: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight: list[torch.Tensor],
    weight_sizes: list[int],
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scalings: list[float],
    indices: torch.Tensor,
    path: str,
    needs_grad: list[bool],
) -> list[torch.Tensor]:
    """``[dx, dbias, *dAs, *dBs]`` (``autograd.multi_lora_backward``); what ``needs_grad`` leaves out is empty.

    The stacked factors and the row grouping are built again from the inputs, as the forward built them."""
    from .autograd import multi_lora_backward, multi_lora_operands

    adapter = _multi_lora(lora_As, lora_Bs, scalings, indices)
    need_x, need_bias, *needs = needs_grad
    with dispatch.device_guard(dy.device):
        operands = multi_lora_operands(adapter, x)
        dx, d_bias, grads = multi_lora_backward(
            adapter, dy, x, left, operands, bias, _weight(weight, weight_sizes), path, need_x, need_bias, needs
        )
    return [g if g is not None else dy.new_empty(_EMPTY) for g in (dx, d_bias, *grads)]


@multi_lora_linear_bwd.register_fake
def _(dy, x, left, bias, weight, weight_sizes, lora_As, lora_Bs, scalings, indices, path, needs_grad):
    like = (x, bias, *lora_As, *lora_Bs)
    return [
        t.new_empty(t.shape) if need and t is not None else dy.new_empty(_EMPTY) for t, need in zip(like, needs_grad)
    ]


def _multi_lora_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, base, bias, weight, weight_sizes, lora_As, lora_Bs, scalings, indices, path = inputs
    ctx.save_for_backward(x, output[1], bias, indices, *lora_As, *lora_Bs, *weight)
    ctx.num_adapters, ctx.weight_sizes, ctx.scalings, ctx.path = len(lora_As), weight_sizes, scalings, path
    ctx.has_base = base is not None
    # needs_input_grad has one flag per list: each factor's own, so a frozen adapter gets no gradient computed
    ctx.factor_needs = [t.requires_grad for t in (*lora_As, *lora_Bs)]


def _multi_lora_backward(ctx: Any, dy: torch.Tensor, _dleft: Optional[torch.Tensor]) -> tuple:
    x, left, bias, indices, *rest = ctx.saved_tensors
    n = ctx.num_adapters
    lora_As, lora_Bs, weight = rest[:n], rest[n : 2 * n], rest[2 * n :]
    need_x = bool(ctx.needs_input_grad[0])
    need_bias = bool(ctx.needs_input_grad[2]) and bias is not None
    needs = [bool(ctx.needs_input_grad[5]) and f for f in ctx.factor_needs[:n]]
    needs += [bool(ctx.needs_input_grad[6]) and f for f in ctx.factor_needs[n:]]
    if ctx.has_base and (need_x or any(needs) or ctx.needs_input_grad[1]):
        raise RuntimeError("multi_lora_linear_fwd with a base output has no backward (call it without base)")
    wanted = [need_x, need_bias, *needs]
    grads = multi_lora_linear_bwd(
        dy, x, left, bias, weight, ctx.weight_sizes, lora_As, lora_Bs, ctx.scalings, indices, ctx.path, wanted
    )
    dx, d_bias, *d_factors = (g if need else None for g, need in zip(grads, wanted))
    return dx, None, d_bias, [None] * len(weight), None, d_factors[:n], d_factors[n:], None, None, None


torch.library.register_autograd(
    "lora_engine::multi_lora_linear_fwd", _multi_lora_backward, setup_context=_multi_lora_setup_context
)


def multi_lora_linear(
    x: torch.Tensor,
    weight: Weight,
    adapter: MultiLora,
    bias: Optional[torch.Tensor],
    path: str,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The mixed batch on 2-D x through the mixed-batch ops (what ``functional.multi_lora_linear_4bit`` runs under
    ``torch.compile``); ``adapter.indices``: int64 [M] on x's device, already range-checked. ``base``: the base
    output computed by the caller (inference only; ``bias`` then None)."""
    tensors, sizes = weight_parts(weight)
    y, _ = multi_lora_linear_fwd(
        x, base, bias, tensors, sizes, list(adapter.lora_As), list(adapter.lora_Bs), list(adapter.scalings),
        adapter.indices, path,
    )  # fmt: skip
    return y

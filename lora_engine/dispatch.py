"""Which implementation runs a call, and where.

The backend: the Triton kernels or the torch reference. ``set_backend`` sets the process default;
``use_backend`` and ``force_path`` hold for a block of code in the calling thread or asyncio task only (they
live in ``contextvars``), so threads serving different models do not see each other's choices.

For a 4-bit weight on the Triton backend, the path (``PATHS``), picked by token count from a per-architecture
table measured with ``python -m bench``:
    fused           the 4-bit decode inside the GEMM's K loop (no dense copy of W)
    dequant         W decoded once per call into a fresh buffer, then the Triton GEMM with the LoRA epilogue
    dequant_cublas  the same decode, then cuBLAS with the LoRA term as its C operand
    gemv            at most ``GEMV_MAX_TOKENS`` rows: a GEMV streaming the packed bytes once, LoRA term fused
The decode buffers come from torch's caching allocator, which keeps them apart per stream and per CUDA graph.

A base-only call (``functional.linear_4bit``: a frozen 4-bit layer without an adapter) has its own table,
``BASE_PATH_STEPS``, over ``BASE_PATHS``: the same paths without the LoRA term, plus "bitsandbytes" (bitsandbytes'
own ``matmul_4bit``, what an unpatched ``bnb.nn.Linear4bit`` runs), which serves CUDA tensors only.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import logging
import sys
from typing import Callable, ContextManager, Iterable, Iterator, Optional

import torch

from .kernels import runtime

logger = logging.getLogger("lora_engine")

BACKENDS = ("auto", "triton", "torch")
PATHS = ("fused", "dequant", "dequant_cublas", "gemv")
BASE_PATHS = PATHS + ("bitsandbytes",)  # paths of a base-only call (no LoRA term)

# Path by token count M, per GPU architecture: ascending (min_tokens, path) steps, read from layer
# benchmarks (`python -m bench`, results in bench/results/<gpu>/layer.md). On sm_90 the fused path's in-loop
# decode measured slower than decoding W once per call at every M, so no step picks it (those measurements
# predate its register-table lookup); it stays available through `force_path`. From a few hundred tokens
# cuBLAS beats the Triton GEMM on the decoded weight. The gemv path is in no table until it is measured.
PATH_STEPS: dict[tuple[int, int], tuple[tuple[int, str], ...]] = {
    (9, 0): ((0, "dequant"), (256, "dequant_cublas")),
}
DEFAULT_PATH_STEPS = ((0, "dequant"), (256, "dequant_cublas"))  # unknown GPUs and the interpreter

# Path of a base-only call (a 4-bit layer without an adapter) by token count M, per GPU architecture. The rule: a
# path that loses to an anchor at some shape is not chosen there. No base-only provider has been benchmarked yet
# (re-measure once `python -m bench` has one); the steps come from the nearest committed H100 figures:
# - bench/results/nvidia-h100-80gb-hbm3/layer_small_m.md, decode, replayed from a CUDA graph at M = 1: our layer
#   47 us (4096x4096) and 132 us (14336x4096), bitsandbytes + PEFT 31 and 49 us with the same LoRA term (its
#   GEMV without it is faster still); eager, every path of ours took 0.25-0.98 ms at M = 1..16.
# - bench/results/nvidia-h100-80gb-hbm3/layer.md, fwd: lora_engine[dequant_cublas] against the dequant_cublas
#   anchor (bitsandbytes' decode + cuBLAS): at M = 1024 slower on two of three shapes (0.2052 vs 0.0929 ms at
#   4096x4096, 0.5400 vs 0.3185 ms at 4096x14336); from M = 4096 on faster on all three (0.2452 vs 0.2569,
#   0.7493 vs 0.8434, 0.7707 vs 0.8460 ms at M = 4096). Between 1024 and 4096 nothing was measured.
# So on CUDA bitsandbytes' kernels run below 4096 tokens and our decode + cuBLAS from there. The interpreter
# and CPU run our kernels at every M ("bitsandbytes" serves CUDA tensors only), so CPU tests exercise them.
BASE_PATH_STEPS: dict[tuple[int, int], tuple[tuple[int, str], ...]] = {
    (9, 0): ((0, "bitsandbytes"), (4096, "dequant_cublas")),
}
DEFAULT_BASE_CUDA_STEPS = ((0, "bitsandbytes"), (4096, "dequant_cublas"))  # CUDA GPUs not in the table
DEFAULT_BASE_PATH_STEPS = ((0, "dequant"),)  # the interpreter (CPU tensors)

_process_backend = "auto"
_scoped_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lora_engine_backend", default=None)
_forced_path: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lora_engine_forced_path", default=None)
# Bumped whenever any setting changes. torch.compile cannot read a ContextVar: it takes the settings as constants
# when it traces a call and guards on this counter, so it traces again after a change.
_settings_epoch = 0
_reported: set[str] = set()


def _constant_for_compiler(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)``: torch.compile calls ``fn`` once while tracing and uses the
    result as a constant (no graph break). That function imports ``torch._dynamo``, which takes seconds and imports
    Triton, so at import time this sets the marker it sets (``tests/lora_engine/test_dispatch.py`` checks that
    the two agree)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_constant_for_compiler
def _scoped_settings() -> tuple[Optional[str], Optional[str]]:
    """The (backend, path) of the innermost :func:`use_backend` / :func:`force_path` here, None where none."""
    return _scoped_backend.get(), _forced_path.get()


def _current_settings() -> tuple[Optional[str], Optional[str]]:
    # comparing the counter makes torch.compile guard on it (a plain read would not)
    return _scoped_settings() if _settings_epoch >= 0 else (None, None)


@contextlib.contextmanager
def _scoped(var: contextvars.ContextVar, value: Optional[str]) -> Iterator[None]:
    global _settings_epoch
    token = var.set(value)
    _settings_epoch += 1
    try:
        yield
    finally:
        var.reset(token)
        _settings_epoch += 1


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def set_backend(backend: str) -> None:
    """Choose the process's default implementation: ``"triton"`` (raises where Triton cannot run), ``"torch"``
    (the reference) or ``"auto"`` (Triton on CUDA tensors, and on fp16/fp32 CPU tensors under
    ``TRITON_INTERPRET=1``; else torch). A :func:`use_backend` block overrides it in its own thread or task."""
    global _process_backend, _settings_epoch
    _check_backend(backend)
    _process_backend = backend
    _settings_epoch += 1


def get_backend() -> str:
    """The backend in force here: the innermost :func:`use_backend` of this thread or task, else the default."""
    scoped = _current_settings()[0]
    return _process_backend if scoped is None else scoped


def use_backend(backend: str) -> ContextManager[None]:
    """Switch the backend for the enclosed block, in the calling thread or asyncio task only."""
    _check_backend(backend)
    return _scoped(_scoped_backend, backend)


def force_path(path: Optional[str]) -> ContextManager[None]:
    """Run the Triton backend through one path regardless of shape, in the enclosed block of this thread or task
    (for tests and benchmarks; ``None`` restores the dispatcher's choice). It holds for base-only calls too."""
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    return _scoped(_forced_path, path)


_triton_found: Optional[bool] = None


def triton_available() -> bool:
    """Whether Triton is installed (probed once: the probe costs microseconds on every call)."""
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def report_once(key: str, message: str) -> None:
    """Log a fallback or notable choice once per process instead of hiding it or repeating it per call."""
    if key not in _reported:
        _reported.add(key)
        logger.warning(message)


def _triton_unusable(device: torch.device, dtypes: Iterable[torch.dtype]) -> Optional[str]:
    """Why the kernels cannot give a right answer for a call on ``device`` with ``dtypes`` (None when they can)."""
    if not triton_available():
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type != "cpu" or not runtime.interpreter_active():
        return (
            f"Triton cannot run on {device.type} tensors (use CUDA tensors, or set {runtime.ENV_VAR}=1 before "
            "importing anything to run the kernels on CPU in Triton's interpreter)"
        )
    if torch.bfloat16 in dtypes:
        return "bfloat16 on CPU: Triton's interpreter computes bf16 on raw bits, so the results would be wrong"
    return None


def use_triton(device: torch.device, dtypes: Iterable[torch.dtype] = ()) -> bool:
    """Whether a call on ``device`` with operands of ``dtypes`` runs the Triton kernels (else the reference).

    Backend "triton" raises where the kernels cannot run or would be wrong; "auto" takes the reference there,
    and reports it once where that is a surprise (CUDA without Triton, bf16 in the interpreter).
    """
    backend = get_backend()
    if backend == "torch":
        return False
    reason = _triton_unusable(device, tuple(dtypes))
    if reason is None:
        if not torch.compiler.is_compiling():  # loaded by the first eager call; the compiled op loads them too
            runtime.load_kernels()
        return True
    if backend == "triton":
        raise RuntimeError(f"lora_engine backend 'triton': {reason}")
    if device.type == "cuda" or torch.bfloat16 in dtypes:
        report_once(f"reference:{reason}", f"lora_engine: {reason}; these calls run the slow torch reference")
    return False


def device_guard(device: torch.device) -> ContextManager:
    """Make ``device`` current while kernels launch: Triton launches on the current CUDA device, and a model
    split over several GPUs calls layers whose tensors live on other ones."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, which returns t itself when it has that dtype already: without the call's µs then (hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def host_to_device(values: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """A small CPU tensor made on the host (indices, scalings) copied to ``device`` without a stream sync.

    A copy from pageable host memory waits for all work queued on the stream: once per layer call, that stalls
    the GPU. Staged in pinned memory the copy is asynchronous (torch's pinned allocator keeps the staging buffer
    until the copy has run). Under CUDA graph capture no host buffer may be read (a replay would read whatever the
    buffer holds then): ``what`` names the argument that must already live on the device.
    """
    if device.type != "cuda":
        return values.to(device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what} is on the CPU during CUDA graph capture: a replay would read a stale host buffer. Pass it as a "
            f"tensor on {device} (it is then read on the device at every replay)"
        )
    return values.pin_memory().to(device, non_blocking=True)


_capabilities: dict[int, tuple[int, int]] = {}


@_constant_for_compiler  # a device query: a constant to torch.compile, not a traced call
def _capability(index: Optional[int]) -> tuple[int, int]:
    index = torch.cuda.current_device() if index is None else index
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def _path_steps(device: Optional[torch.device]) -> tuple[tuple[int, str], ...]:
    if device is None or device.type != "cuda":
        return DEFAULT_PATH_STEPS
    return PATH_STEPS.get(_capability(device.index), DEFAULT_PATH_STEPS)


def _base_path_steps(device: Optional[torch.device]) -> tuple[tuple[int, str], ...]:
    if device is None or device.type != "cuda":
        return DEFAULT_BASE_PATH_STEPS
    return BASE_PATH_STEPS.get(_capability(device.index), DEFAULT_BASE_CUDA_STEPS)


def choose_path(
    num_tokens: int,
    out_features: int,
    in_features: int,
    device: Optional[torch.device] = None,
    base_only: bool = False,
) -> str:
    """The path for a 4-bit layer seeing ``num_tokens`` rows on ``device``: one of ``PATHS``, or of
    ``BASE_PATHS`` for a ``base_only`` call (no LoRA term). A :func:`force_path` block decides both."""
    forced = _current_settings()[1]
    if forced is not None:
        return forced
    path = PATHS[0]
    for min_tokens, step_path in _base_path_steps(device) if base_only else _path_steps(device):
        if num_tokens >= min_tokens:
            path = step_path
    return path


def bitsandbytes_token_limit(device: Optional[torch.device] = None) -> Optional[int]:
    """Below how many tokens a base-only call on CUDA ``device`` keeps bitsandbytes' kernels (``sys.maxsize``:
    at every count; None: never). Without a device: the current GPU's table, or the default for CUDA GPUs on a
    machine without one. The tables put "bitsandbytes" only as their first step (tests check it)."""
    if device is not None and device.type == "cuda":
        steps = _base_path_steps(device)
    elif device is None and torch.cuda.is_available():
        steps = _base_path_steps(torch.device("cuda"))
    else:
        steps = DEFAULT_BASE_CUDA_STEPS
    if steps[0][1] != "bitsandbytes":
        return None
    return steps[1][0] if len(steps) > 1 else sys.maxsize

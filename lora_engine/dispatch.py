"""Which implementation runs a call: the backend (Triton kernels or the torch reference) and, for Triton,
the path (4-bit decode fused into the GEMM, or decode into a reused buffer followed by a dense GEMM).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import Iterator, Optional

import torch

logger = logging.getLogger("lora_engine")

BACKENDS = ("auto", "triton", "torch")
PATHS = ("fused", "dequant", "dequant_cublas", "gemv")

# Path by token count M, per GPU architecture: ascending (min_tokens, path) steps, read from layer
# benchmarks (`python -m bench`, results in bench/results/<gpu>/layer.md). On sm_90 the in-loop decode of the
# "fused" path measured slower than decoding W once per call at every M (its per-element code lookups cost
# more than the GEMM), so no step picks it; it stays available through `force_path`. From a few hundred
# tokens cuBLAS beats the Triton GEMM on the decoded weight. The "gemv" path (at most 16 tokens, streaming the
# packed bytes once) is not in any table until it is measured on that architecture.
PATH_STEPS: dict[tuple[int, int], tuple[tuple[int, str], ...]] = {
    (9, 0): ((0, "dequant"), (256, "dequant_cublas")),
}
DEFAULT_PATH_STEPS = ((0, "dequant"), (256, "dequant_cublas"))  # unknown GPUs and the interpreter

_backend = "auto"
_forced_path: Optional[str] = None
_reported: set[str] = set()


def set_backend(backend: str) -> None:
    """Choose the implementation: ``"triton"`` (raises where Triton cannot run), ``"torch"`` (the reference)
    or ``"auto"`` (Triton on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``; else torch)."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _backend = backend


def get_backend() -> str:
    """The backend chosen by :func:`set_backend` (``"auto"`` by default)."""
    return _backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Temporarily switch the backend."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


@contextlib.contextmanager
def force_path(path: Optional[str]) -> Iterator[None]:
    """Run the Triton backend through one path regardless of shape (for tests and benchmarks)."""
    global _forced_path
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


_triton_found: Optional[bool] = None


def triton_available() -> bool:
    """Whether Triton is installed (probed once: the probe costs microseconds on every call)."""
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def report_once(key: str, message: str) -> None:
    """Log a fallback or notable choice once per process instead of hiding it or repeating it per call."""
    if key not in _reported:
        _reported.add(key)
        logger.warning(message)


def use_triton(device: torch.device) -> bool:
    """Whether a call on ``device`` runs the Triton kernels; raises if the backend demands what cannot run."""
    runnable = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()))
    if _backend == "torch":
        return False
    if _backend == "triton":
        if not runnable:
            why = "Triton is not installed" if not triton_available() else f"Triton cannot run on {device} tensors"
            raise RuntimeError(
                f"lora_engine backend 'triton': {why} (use CUDA tensors, or set TRITON_INTERPRET=1 before importing "
                "lora_engine to run the kernels on CPU in the interpreter)"
            )
        return True
    if not runnable and device.type == "cuda":
        report_once("no-triton-cuda", "lora_engine: Triton is not installed; CUDA calls use the slow torch reference")
    return runnable


_capabilities: dict[int, tuple[int, int]] = {}


@torch.compiler.assume_constant_result  # a device query: a constant to torch.compile, not a traced call
def _capability(index: Optional[int]) -> tuple[int, int]:
    index = torch.cuda.current_device() if index is None else index
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def _path_steps(device: Optional[torch.device]) -> tuple[tuple[int, str], ...]:
    if device is None or device.type != "cuda":
        return DEFAULT_PATH_STEPS
    return PATH_STEPS.get(_capability(device.index), DEFAULT_PATH_STEPS)


def choose_path(num_tokens: int, out_features: int, in_features: int, device: Optional[torch.device] = None) -> str:
    """The path (one of ``PATHS``) for a 4-bit layer seeing ``num_tokens`` rows on ``device``."""
    if _forced_path is not None:
        return _forced_path
    path = PATHS[0]
    for min_tokens, step_path in _path_steps(device):
        if num_tokens >= min_tokens:
            path = step_path
    return path


_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_workspace(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, shared by all layers on ``device`` (grown on demand).

    Layers run one after another on a stream, so one buffer per device and dtype holds each decoded weight
    just long enough for its GEMM.
    """
    key = (device, dtype)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[key] = buffer
    return buffer


def release_workspaces() -> None:
    """Free the decode workspaces (they are re-created on the next call that needs one)."""
    _workspaces.clear()

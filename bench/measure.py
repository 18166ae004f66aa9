"""Timing and memory of one runnable on the GPU, and the record format written to results/."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path
from typing import Any

import torch

from .providers import Runnable

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(gpu_name: str) -> Path:
    """``bench/results/<gpu>/``, the GPU's name as a slug (e.g. ``nvidia-h100-80gb-hbm3``): every result of a GPU."""
    return RESULTS / re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()


RECORD_FIELDS = ("gpu", "model", "proj", "N", "K", "M", "mode", "provider", "median_ms", "p20_ms", "p80_ms",
                 "peak_mib", "tflops", "gbps")  # fmt: skip


def environment() -> dict[str, Any]:
    """GPU name and library versions, stored with every result."""
    import bitsandbytes
    import peft
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "peft": peft.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def peak_extra_mib(run: Runnable) -> float:
    """Peak memory one call allocates above what is live before it (its decoded weights included)."""
    for leaf in run.grad_leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run.fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_ms(run: Runnable, rep_ms: int) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of one call in ms (``triton.testing.do_bench``, L2 flushed per call)."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(
        run.fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(run.grad_leaves)
    )
    return median, p20, p80


def layer_flops(n: int, k: int, m: int, mode: str) -> float:
    """Useful flops of the base product: 2·M·N·K forward, twice that more for dx (the LoRA terms excluded)."""
    return 2.0 * m * n * k * (2 if mode == "fwdbwd" else 1)

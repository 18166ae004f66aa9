"""Timing and memory of the runnables of one case on the GPU, and the record format written to results/.

Every provider of a case gets two times, each the median (with 20th and 80th percentiles) of calls made with the L2
cache flushed before each:
    eager   the Python call as a model makes it, from an idle GPU: host time included where the host is slower
    device  the same call captured once in a CUDA graph and replayed: GPU time alone
The providers of a case are measured interleaved, a few rounds of each in turn (``schedule``), so that drift of
clocks or temperature hits them alike; each round's median is kept, and a cell whose rounds differ by more than
``DRIFT_LIMIT`` is flagged.
"""

from __future__ import annotations

import datetime
import platform
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .providers import Runnable

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(gpu_name: str) -> Path:
    """``bench/results/<gpu>/``, the GPU's name as a slug (e.g. ``nvidia-h100-80gb-hbm3``): every result of a GPU."""
    return RESULTS / re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()


# What one record of results/<gpu>/<stem>.json holds, besides the environment (see ``environment``):
#   case: gpu, model, proj, N, K, M, mode, provider; peak_mib (one eager call, above what was live before it)
#   eager_ms, eager_p20_ms, eager_p80_ms   one Python call from an idle GPU (see ``eager_times_ms``)
#   device_ms, device_p20_ms, device_p80_ms   the same call replayed from a CUDA graph (``replay_times_ms``);
#       null with device_error (why) where the call cannot be captured
#   <kind>_repeats_ms: the median of each round; <kind>_drift: max/min - 1 over them (flagged above DRIFT_LIMIT)
#   calls: calls per round and kind; tflops, gbps (eager), device_tflops, device_gbps
#   median_ms, p20_ms, p80_ms: the eager figures again, the names that files written before device time had
#   error: why the provider failed on this case (no timings then)
RECORD_FIELDS = ("gpu", "model", "proj", "N", "K", "M", "mode", "provider", "eager_ms", "eager_p20_ms", "eager_p80_ms",
                 "eager_repeats_ms", "eager_drift", "device_ms", "device_p20_ms", "device_p80_ms", "device_repeats_ms",
                 "device_drift", "device_error", "calls", "peak_mib", "tflops", "gbps", "device_tflops", "device_gbps",
                 "median_ms", "p20_ms", "p80_ms")  # fmt: skip
KINDS = ("eager", "device")
DRIFT_LIMIT = 0.05  # two rounds of one cell further apart than this: flagged `~` in the table
MIN_CALLS = 3  # calls per round and kind, however slow the call (quartiles need a few)
MAX_CALLS = 2000  # calls per round and kind, however fast
L2_FLUSH_BYTES = 256 * 2**20  # zeroed before every timed call: larger than any GPU's L2 (H100: 50 MiB)


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


@dataclass
class Cell:
    """One provider on one case: its runnable, its CUDA graph (or why there is none) and the per-call times of each
    round, per kind."""

    run: Runnable
    graph: Optional[torch.cuda.CUDAGraph] = None
    device_error: Optional[str] = None
    calls: dict[str, int] = field(default_factory=dict)
    times: dict[str, list[list[float]]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    error: Optional[str] = None


def describe(exc: BaseException) -> str:
    """An exception as one short line for a record."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


_flush_buffers: dict[int, torch.Tensor] = {}


def _flush_l2() -> None:
    """Evict the L2 cache of the current device (as ``triton.testing.do_bench`` does between calls)."""
    device = torch.cuda.current_device()
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    _flush_buffers[device].zero_()


def _reset_grads(run: Runnable) -> None:
    for leaf in run.grad_leaves:
        leaf.grad = None  # each fwdbwd call writes fresh grads, as a training step does; no accumulation


def eager_times_ms(run: Runnable, calls: int) -> list[float]:
    """ms of each of ``calls`` eager calls: L2 flushed, the GPU left idle, then CUDA events around the Python call.

    Starting from an idle GPU, the host's time to launch the call's kernels counts in full where the host is slower
    than the GPU (``do_bench`` queues each call behind its L2 flush, which hides up to the flush's GPU time of host
    work); where the GPU is slower it is the GPU time plus one launch latency."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        _reset_grads(run)
        _flush_l2()
        torch.cuda.synchronize()
        start.record()
        run.fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def replay_times_ms(graph: torch.cuda.CUDAGraph, calls: int) -> list[float]:
    """ms of each of ``calls`` replays of a captured call, L2 flushed before each: GPU time alone (the host queues
    the replay while the GPU flushes)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        _flush_l2()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def capture(run: Runnable) -> torch.cuda.CUDAGraph:
    """The call captured once in a CUDA graph (fwdbwd: forward and backward through autograd, grads reset first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, autotune and allocate outside the capture, on a side stream as capture needs
            _reset_grads(run)
            run.fn()
    torch.cuda.current_stream().wait_stream(stream)
    _reset_grads(run)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run.fn()
    torch.cuda.synchronize()
    graph.replay()  # a graph that captured but cannot replay fails here, not in the timing
    torch.cuda.synchronize()
    return graph


def _calls(estimate_ms: float, budget_ms: float) -> int:
    return max(MIN_CALLS, min(MAX_CALLS, int(budget_ms / max(estimate_ms, 1e-4))))


def prepare(run: Runnable, rep_ms: float, rounds: int) -> Cell:
    """Warm ``run`` up, capture it (recording why not where that fails) and size its rounds: about ``rep_ms`` of
    measured calls per kind, split over ``rounds``."""
    cell = Cell(run)
    estimate = statistics.median(eager_times_ms(run, MIN_CALLS))
    eager_times_ms(run, _calls(estimate, rep_ms / 4))  # warm-up: clocks, caches, allocator
    cell.calls["eager"] = _calls(estimate, rep_ms / rounds)
    try:
        cell.graph = capture(run)
    except Exception as exc:  # e.g. a host sync or a CPU tensor in the call: eager time only
        cell.device_error = f"not capturable: {describe(exc)}"
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    else:
        estimate = statistics.median(replay_times_ms(cell.graph, MIN_CALLS))
        cell.calls["device"] = _calls(estimate, rep_ms / rounds)
    return cell


def schedule(providers: list[str], rounds: int) -> list[tuple[int, str]]:
    """``(round, provider)`` in measuring order: every provider once per round, round after round, the first
    provider of each round rotated, so that drift of clocks or temperature hits every provider alike."""
    order = []
    for r in range(rounds):
        shift = r % len(providers) if providers else 0
        order += [(r, p) for p in providers[shift:] + providers[:shift]]
    return order


def measure_case(
    cells: dict[str, Cell],
    rounds: int,
    eager: Callable[[Runnable, int], list[float]] = eager_times_ms,
    replay: Callable[[torch.cuda.CUDAGraph, int], list[float]] = replay_times_ms,
) -> None:
    """Time the cells of one case interleaved (see ``schedule``), eager then replayed at each turn; a provider that
    fails keeps its error and drops out of the later rounds."""
    for _, provider in schedule(list(cells), rounds):
        cell = cells[provider]
        if cell.error is not None:
            continue
        try:
            cell.times["eager"].append(eager(cell.run, cell.calls["eager"]))
            if cell.graph is not None:
                cell.times["device"].append(replay(cell.graph, cell.calls["device"]))
        except Exception as exc:  # e.g. out of memory: the other providers go on
            cell.error = describe(exc)


def summarize(rounds: list[list[float]]) -> dict[str, Any]:
    """Median, 20th and 80th percentile over every call of every round, the median of each round, and the drift
    between rounds (max/min - 1 of those medians; None with fewer than two rounds)."""
    if not rounds or not any(rounds):
        return {"ms": None, "p20_ms": None, "p80_ms": None, "repeats_ms": [], "drift": None}
    pooled = torch.tensor([t for r in rounds for t in r], dtype=torch.float64)
    median, p20, p80 = pooled.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    repeats = [statistics.median(r) for r in rounds if r]
    drift = max(repeats) / min(repeats) - 1 if len(repeats) >= 2 and min(repeats) > 0 else None
    return {"ms": median, "p20_ms": p20, "p80_ms": p80, "repeats_ms": repeats, "drift": drift}


def timing_fields(cell: Cell, flops: float, weight_bytes: int) -> dict[str, Any]:
    """The record fields of a measured cell (see ``RECORD_FIELDS``)."""
    fields: dict[str, Any] = {"calls": dict(cell.calls)}
    for kind in KINDS:
        s = summarize(cell.times[kind])
        fields.update({f"{kind}_ms": s["ms"], f"{kind}_p20_ms": s["p20_ms"], f"{kind}_p80_ms": s["p80_ms"],
                       f"{kind}_repeats_ms": s["repeats_ms"], f"{kind}_drift": s["drift"]})  # fmt: skip
    if fields["device_ms"] is None:
        fields["device_error"] = cell.device_error or cell.error or "not measured"
    fields.update(median_ms=fields["eager_ms"], p20_ms=fields["eager_p20_ms"], p80_ms=fields["eager_p80_ms"])
    for prefix, kind in (("", "eager"), ("device_", "device")):
        ms = fields[f"{kind}_ms"]
        if ms:
            fields[f"{prefix}tflops"] = flops / (ms * 1e-3) / 1e12
            fields[f"{prefix}gbps"] = weight_bytes / (ms * 1e-3) / 1e9
    return fields


def layer_flops(n: int, k: int, m: int, mode: str) -> float:
    """Useful flops of the base product: 2·M·N·K forward, twice that more for dx (the LoRA terms excluded)."""
    return 2.0 * m * n * k * (2 if mode == "fwdbwd" else 1)

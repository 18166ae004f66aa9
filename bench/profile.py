"""``python -m bench.profile``: where one layer call spends its GPU time, kernel by kernel, per provider.

Prints the CUDA kernels each provider launches (mean microseconds per call, from ``torch.profiler``) and the
resources of every compiled Triton kernel of lora_engine (registers, spills, shared memory), the first
things to read when a path is slower than expected.
"""

from __future__ import annotations

import argparse
import importlib
from collections import defaultdict
from collections.abc import Iterator

import torch

from .providers import ALL_PROVIDERS, DEFAULT_PROVIDERS, MODES, Runnable, build, make_inputs

# Modules of lora_engine.kernels whose compiled Triton kernels are listed (every module that launches one).
KERNEL_MODULES = ("dequantize", "dropout", "lora_gemv", "lora_lowrank", "lora_matmul", "lora_multi")


def kernel_times(fn, calls: int = 5) -> dict[str, float]:
    """Mean device microseconds per call of each CUDA kernel ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def triton_resources() -> list[str]:
    """One line per compiled variant of lora_engine's Triton kernels: registers, spills, shared bytes."""
    lines = []
    for module in (importlib.import_module(f"lora_engine.kernels.{module_name}") for module_name in KERNEL_MODULES):
        for name in dir(module):
            kernel = getattr(module, name)
            caches = getattr(kernel, "device_caches", None)
            if not name.startswith("_") or not caches:
                continue
            for cache in caches.values():
                for compiled in cache[0].values():
                    consts = {k: v for k, v in compiled.src.constants.items() if isinstance(k, str) and k.isupper()} \
                        if hasattr(compiled, "src") and hasattr(compiled.src, "constants") else {}
                    lines.append(f"{name}: regs {compiled.n_regs}, spills {compiled.n_spills}, "
                                 f"shared {compiled.metadata.shared} B, warps {compiled.metadata.num_warps}, "
                                 f"stages {compiled.metadata.num_stages} {consts}")  # fmt: skip
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: shape, token counts, modes and providers to profile."""
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--shape", nargs=2, type=int, default=[4096, 4096], metavar=("N", "K"))
    p.add_argument("--m", nargs="+", type=int, default=[1, 8192])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=MODES)
    p.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS), choices=ALL_PROVIDERS)
    return p.parse_args(argv)


def cases(
    args: argparse.Namespace, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"
) -> Iterator[tuple[str, Runnable | None]]:
    """A label and the runnable of each M, mode and provider asked for (None where the provider does not apply)."""
    n, k = args.shape
    for m in args.m:
        inputs = make_inputs(n, k, m, dtype=dtype, device=device)
        for mode in args.modes:
            for provider in args.providers:
                yield f"{provider} {mode} N={n} K={k} M={m}", build(provider, inputs, mode)


def main(argv: list[str] | None = None) -> int:
    for label, run in cases(parse_args(argv)):
        if run is None:
            print(f"\n{label}: does not apply")
            continue
        times = kernel_times(run.fn)
        total = sum(times.values())
        print(f"\n{label}: {total:.1f} us of kernels per call")
        for kernel, us in list(times.items())[:8]:
            print(f"  {us:9.1f} us  {kernel[:110]}")
    print("\nTriton kernels compiled:")
    for line in triton_resources():
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

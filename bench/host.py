"""``python -m bench.host``: host time of one layer call per path, the cost that dominates eager calls at small M.

Two ways to see it:
    --launches stub   every Triton launch replaced by a no-op: what the Python side (validation, dispatch,
                      torch ops, allocation) costs, on any machine, the CPU included
    --launches real   (CUDA) real launches on a tiny layer, so the GPU finishes each kernel before the host issues
                      the next: host time with Triton's launch path included
Two layers (``--layers``), a table each:
    functional        ``lora_engine.lora_linear_4bit`` called directly
    peft              PEFT's ``lora.Linear4bit`` patched by ``patch_peft_model``, called as a patched model calls
                      it (``layer(x)``): the forward in eval mode under ``torch.no_grad()`` (generation, evaluation),
                      forward + backward in train mode with x requiring grad (training)
Medians over repeated runs of ``--calls`` calls; fp32 on CPU, bf16 on a GPU. Host time does not depend on the
layer's size, which is kept tiny so that the kernels (or, on CPU, torch's small products) stay negligible.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional

PATHS = ("dequant", "dequant_cublas", "fused", "gemv")
LAYERS = ("functional", "peft")
FEATURES, RANK = 64, 16  # the layer: 64 x 64 NF4 (double-quantized absmax), LoRA rank 16, scaling 2


def _stub_launches() -> None:
    """Replace the launch of every kernel (interpreted or compiled) with a no-op."""
    from lora_engine.kernels import dropout, runtime

    runtime.load_kernels()
    kernel_type = type(dropout._dropout_scale_kernel)
    kernel_type.__getitem__ = lambda self, grid: lambda *args, **kwargs: None


def _functional_call(m: int, backward: bool, device: str, dtype) -> Callable[[], None]:
    """One ``lora_linear_4bit`` call (and its backward) on the bench layer."""
    import torch

    import lora_engine
    from lora_engine.format import quantize_weight

    torch.manual_seed(0)
    weight = quantize_weight(torch.randn(FEATURES, FEATURES) * 0.02, device=device)
    x = torch.randn(m, FEATURES, device=device, dtype=dtype, requires_grad=backward)
    lora_A = torch.randn(RANK, FEATURES, device=device, dtype=dtype, requires_grad=backward)
    lora_B = torch.randn(FEATURES, RANK, device=device, dtype=dtype, requires_grad=backward)
    state = weight.quant_state
    dy = torch.ones(m, FEATURES, device=device, dtype=dtype)

    def call() -> None:
        y = lora_engine.lora_linear_4bit(x, weight, state, lora_A, lora_B, 2.0)
        if backward:
            y.backward(dy)

    return call


def _peft_call(m: int, backward: bool, device: str, dtype) -> Callable[[], None]:
    """One call of a patched PEFT ``lora.Linear4bit`` (and its backward) on the bench layer."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    import lora_engine

    class Net(torch.nn.Module):
        is_loaded_in_4bit = True  # as transformers sets it on a 4-bit model: PEFT then wraps lora.Linear4bit

        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(FEATURES, FEATURES, bias=False, compute_dtype=dtype, quant_type="nf4",
                                          compress_statistics=True)  # fmt: skip

    torch.manual_seed(0)
    model = get_peft_model(Net().to(device), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"]))
    report = lora_engine.patch_peft_model(model)
    if report.num_fused != 1:
        raise RuntimeError(f"the bench's PEFT layer does not run the fused kernels: {report}")
    layer = model.base_model.model.proj
    model.train(backward)
    x = torch.randn(1, m, FEATURES, device=device, dtype=dtype, requires_grad=backward)
    dy = torch.ones(1, m, FEATURES, device=device, dtype=dtype)

    def call() -> None:
        if backward:
            layer(x).backward(dy)
        else:
            with torch.no_grad():
                layer(x)

    return call


def host_us(
    layer: str, path: str, m: int, backward: bool, device: str, dtype, calls: int, repeats: int
) -> float:
    """Median µs per call of ``layer`` (forward, or forward + backward) on a 64 x 64 NF4 layer with rank 16."""
    import torch

    import lora_engine

    call = (_peft_call if layer == "peft" else _functional_call)(m, backward, device, dtype)
    samples = []
    with lora_engine.use_backend("triton"), lora_engine.force_path(path):
        for _ in range(max(10, calls // 10)):  # compile, allocate, fill the caches
            call()
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


_TITLES = {
    "functional": "lora_engine.lora_linear_4bit",
    "peft": "PEFT lora.Linear4bit patched by patch_peft_model (fwd: eval, no_grad; fwd+bwd: train)",
}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--launches", choices=("stub", "real"), default=None, help="default: real on CUDA, stub elsewhere")
    p.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS), help="a table per layer")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--m", nargs="+", type=int, default=[1, 16, 256])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import torch  # importing torch does not import Triton: the interpreter can still be asked for below

    cuda = torch.cuda.is_available()
    launches = args.launches or ("real" if cuda else "stub")
    if launches == "real" and not cuda:
        p.error("--launches real needs a CUDA GPU")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton
    if launches == "stub":
        _stub_launches()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    for i, layer in enumerate(args.layers):
        if i:
            print()
        print(f"host µs per call, {_TITLES[layer]}, launches {launches}, {device} {str(dtype)[6:]}, r={RANK} "
              f"(median of {args.repeats} x {args.calls} calls)\n")  # fmt: skip
        print(f"| {'path':15} | {'M':>5} | {'fwd':>8} | {'fwd+bwd':>8} |")
        print(f"|{'-' * 17}|{'-' * 7}|{'-' * 10}|{'-' * 10}|")
        for path in args.paths:
            for m in args.m:
                if path == "gemv" and m > 16:
                    continue  # the GEMV serves at most 16 tokens
                fwd = host_us(layer, path, m, False, device, dtype, args.calls, args.repeats)
                both = host_us(layer, path, m, True, device, dtype, args.calls, args.repeats)
                print(f"| {path:15} | {m:>5} | {fwd:>8.1f} | {both:>8.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

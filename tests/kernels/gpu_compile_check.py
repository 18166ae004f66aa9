"""Compile every kernel variant the launchers produce for real NVIDIA targets, without a GPU.

Run as a script (TRITON_INTERPRET must be unset): the launchers are driven with CPU tensors, each launch is
intercepted, and the kernel is compiled by Triton's real pipeline to a cubin for the requested architectures.
This catches what the interpreter cannot: type errors of the compiler, layouts it rejects, and tile configs
that overflow shared memory. Prints one JSON record per compiled kernel on stdout.

    python tests/kernels/gpu_compile_check.py [--arch 90 80] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912, 89: 101376}  # bytes per block (opt-in maximum)


def compile_launches(drive, archs: list[int]) -> list[dict]:
    """Run ``drive()`` with kernel launches replaced by compilation for each arch; return one record each.

    Each launch is specialized by Triton's own binder, as a real launch would be: pointers and integers divisible
    by 16 carry that assumption into the compiled code (16-byte vector loads), and integers equal to 1 become
    constants. (The CPU tensors come from an allocator aligned like CUDA's, so the alignment matches.)
    """
    records: list[dict] = []
    seen: set[str] = set()
    targets = {arch: GPUTarget("cuda", arch, 32) for arch in archs}
    backends = {arch: make_backend(target) for arch, target in targets.items()}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        for arch, backend in backends.items():
            bound, specialization, launch_options = create_function_from_signature(
                self.signature, self.params, backend
            )(*args, **kwargs)
            options, signature, constexprs, attrs = self._pack_args(
                backend, launch_options, bound, specialization, launch_options
            )
            key = json.dumps([self.__name__, arch, str(specialization), sorted(launch_options.items())])
            if key in seen:
                continue
            seen.add(key)
            record = dict(kernel=self.__name__, arch=arch, options=launch_options,
                          constexprs={self.arg_names[k[0]]: str(v) for k, v in constexprs.items()},
                          aligned=sorted(name for (index,), attr in attrs.items() if attr
                                         for name in [self.arg_names[index]]))  # fmt: skip
            try:
                compiled = triton.compile(ASTSource(self, signature, constexprs, attrs), target=targets[arch],
                                          options=options.__dict__)  # fmt: skip
                record.update(ok=True, shared=compiled.metadata.shared)
                record["fits"] = compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]
            except Exception as error:  # report every failure, keep compiling the rest
                record.update(ok=False, error=f"{type(error).__name__}: {str(error)[:2000]}")
            records.append(record)
        return None

    original = JITFunction.run
    JITFunction.run = compile_instead
    try:
        drive()
    finally:
        JITFunction.run = original
    return records


def drive_launchers(quick: bool) -> None:
    """Call every launcher the layer uses, over the dtypes and regimes that select distinct kernel variants."""
    import bitsandbytes.functional as bnbF
    from lora_engine.kernels.dequantize import dequantize_4bit
    from lora_engine.kernels.dropout import dropout_scale_
    from lora_engine.kernels.lora_gemv import gemv_supported, lora_gemv_4bit
    from lora_engine.kernels.lora_lowrank import lora_da, lora_down, lora_dy_pass
    from lora_engine.kernels.configs import GEMV_LOOKUPS, gemv_config, gemv_variant, multi_lora_config
    from lora_engine.kernels.lora_matmul import lora_matmul
    from lora_engine.kernels.lora_multi import multi_lora_expand, multi_lora_shrink, segment_metadata
    from lora_engine.kernels.operands import Dropout

    from lora_engine.format import packed_4bit

    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    token_counts = [1, 4096] if quick else [1, 64, 4096]
    # (N, K, blocksize, nested): blocksize divides K (one scale per row) / straddling blocks with odd K.
    # Nested absmax on the straddling shape: its per-element scale gathers need the most shared memory.
    weights = [(256, 512, 64, True), (96, 75, 64, True)]
    for n, k, blocksize, nested in weights:
        packed, state = bnbF.quantize_4bit(torch.randn(n, k), blocksize=blocksize, compress_statistics=nested)
        weight = packed_4bit(packed, state)
        for dtype in dtypes:
            dequantize_4bit(weight, dtype)
            for m in [1, 16] if quick else [1, 4, 16]:
                if gemv_supported(m, weight):
                    x, lora_B = torch.randn(m, k, dtype=dtype), torch.randn(n, 16, dtype=dtype)
                    lora_gemv_4bit(x, weight, right=lora_B, left=torch.empty(m, 16), scaling=2.0,
                                   bias=torch.randn(n, dtype=dtype))  # fmt: skip
                    lora_gemv_4bit(x, weight)
                    lora_gemv_4bit(x, weight, in_scale=torch.randn(k), bias=torch.randn(n, dtype=dtype))  # IA3
                    lora_gemv_4bit(x, weight, out_scale=torch.randn(n), bias=torch.randn(n, dtype=dtype))
                    if dtype != torch.bfloat16 or m not in (1, 16):
                        continue
                    # the decode variants and split K (two parts of K = 512; the reduction with each epilogue), at
                    # the fewest and most tokens in the GPU's dtype: the variants differ in the decode, not in x
                    tiles = gemv_config(m, 16)
                    for lookup, split_k in itertools.product(GEMV_LOOKUPS, [1, 2]):
                        if (lookup, split_k) == ("table16", 1):
                            continue  # the default, compiled above
                        cfg = gemv_variant(tiles, lookup, split_k)
                        lora_gemv_4bit(x, weight, right=lora_B, left=torch.empty(m, 16), scaling=2.0,
                                       bias=torch.randn(n, dtype=dtype), config=cfg)  # fmt: skip
                        if split_k > 1:
                            lora_gemv_4bit(x, weight, in_scale=torch.randn(k), config=cfg)
                            lora_gemv_4bit(x, weight, out_scale=torch.randn(n), bias=torch.randn(n, dtype=dtype),
                                           config=cfg)  # fmt: skip
            for m in token_counts:
                x, dy = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
                lora_A, lora_B = torch.randn(16, k, dtype=dtype), torch.randn(n, 16, dtype=dtype)
                left = torch.empty(m, 16)
                drop = Dropout(1, 0.1, k)
                lora_matmul(x, weight, weight_out_by_in=True, right=lora_B, down=lora_A.t(), left_out=left, scaling=2.0,
                            bias=torch.randn(n, dtype=dtype))  # fmt: skip
                lora_matmul(x, weight, weight_out_by_in=True, right=lora_B, left=left, scaling=2.0)
                lora_matmul(dy, weight, weight_out_by_in=False, right=lora_A.t(), left=left, scaling=2.0, dropout=drop)
                dense = torch.randn(n, k, dtype=dtype)
                lora_matmul(x, dense, weight_out_by_in=True, right=lora_B, down=lora_A.t(), left_out=left, scaling=2.0)
                lora_matmul(dy, dense, weight_out_by_in=False, right=lora_A.t(), left=left, scaling=2.0)
                if m in (token_counts[0], token_counts[-1]):
                    # IA3: the scale in the prologue (forward of input scaling, dx of output scaling) or the epilogue
                    bias = torch.randn(n, dtype=dtype)
                    lora_matmul(x, weight, weight_out_by_in=True, in_scale=torch.randn(k), bias=bias)
                    lora_matmul(x, weight, weight_out_by_in=True, out_scale=torch.randn(n), bias=bias)
                    lora_matmul(dy, weight, weight_out_by_in=False, in_scale=torch.randn(n))
                    # DoRA: the row scale on the product and the LoRA term, before the bias
                    lora_matmul(x, weight, weight_out_by_in=True, right=lora_B, left=left, scaling=2.0, bias=bias,
                                out_scale=torch.randn(n), scale_bias=False)  # fmt: skip
                    # mixed batch: three adapters stacked to rank 16, rows of no adapter, rows grouped by adapter
                    segments = segment_metadata(torch.arange(m) % 4 - 1, 3, multi_lora_config(m).block_m)
                    left_mixed = multi_lora_shrink(x, torch.randn(3, 16, k, dtype=dtype), segments)
                    multi_lora_expand(torch.randn(m, n, dtype=dtype), left_mixed, torch.randn(3, n, 16, dtype=dtype),
                                      torch.ones(3), segments)  # fmt: skip
                lora_down(x, lora_A.t(), drop)
                lora_dy_pass(dy, lora_B, left, 2.0)
                lora_da(left, x, 2.0, drop)
                dropout_scale_(torch.randn(m, k, dtype=dtype), drop)  # dx of the dequant_cublas path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--quick", action="store_true", help="bf16 only, two token counts")
    args = parser.parse_args(argv)
    records = compile_launches(lambda: drive_launchers(args.quick), args.arch)
    for record in records:
        print(json.dumps(record))
    return 0 if all(r["ok"] and r.get("fits") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

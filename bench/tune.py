"""``python -m bench.tune``: sweep the GEMM and GEMV kernels' tile configs per regime and report the fastest.

For each shape and M, times ``lora_matmul`` (forward orientation, LoRA epilogue) over candidate
``MatmulConfig``s on the packed 4-bit weight (the fused path) and on the decoded weight (the GEMM of the
dequant path), and, for M <= 16, ``lora_gemv_4bit`` (the gemv path) over candidate ``GemvConfig``s, next to
cuBLAS on the decoded weight. Prints the fastest config of each case and writes every candidate's time, with
the GPU, library versions and date, to ``bench/results/<gpu>/tune_matmul.json``.

The output is a report, not an input: nothing reads it at run time. The tiles the kernels use are the
hand-written ones in ``lora_engine.kernels.configs`` (``kernels/configs.py``); to adopt a winner, edit the
tiles of its regime there and cite the measurement beside them.
"""

from __future__ import annotations

import argparse
import itertools
import json

from .measure import environment, results_dir
from .providers import make_inputs


def candidates(m: int):
    from lora_engine.kernels.configs import MatmulConfig

    if m <= 16:
        grid = itertools.product([16], [16, 32, 64], [64], [2, 4], [3], [1, 2, 4, 8, 16])
    elif m <= 256:
        grid = itertools.product([32, 64], [32, 64, 128], [64], [4], [2, 3, 4], [1, 2])
    else:
        grid = itertools.product([64, 128], [64, 128, 256], [64], [4, 8], [3, 4], [1])
    for bm, bn, bk, warps, stages, split_k in grid:
        yield MatmulConfig(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps, num_stages=stages,
                           split_k=split_k)  # fmt: skip


def gemv_candidates(m: int, rank: int):
    from lora_engine.kernels.configs import GemvConfig, gemv_config

    default = gemv_config(m, rank)
    m_pad, block_r = default.m_pad, default.block_r
    for bn, bk, warps, stages in itertools.product([2, 4, 8, 16, 32, 64], [128, 256, 512], [1, 2, 4, 8], [1, 2, 3]):
        if m_pad * bn * bk <= 32768:  # the per-step product must fit in registers
            yield GemvConfig(m_pad=m_pad, block_n=bn, block_k=bk, block_r=block_r, num_warps=warps, num_stages=stages)


def _sweep(candidates, call, rep_ms: int, row: dict, rows: list):
    """Time ``call(cfg)`` for each candidate; append a row each; return (best ms, best config) or None."""
    import triton.testing

    best = None
    for cfg in candidates:
        try:
            call(cfg)
            ms, err = triton.testing.do_bench(lambda cfg=cfg: call(cfg), rep=rep_ms), None
        except Exception as exc:  # configs that overflow shared memory or registers
            ms, err = None, type(exc).__name__
        rows.append(dict(row, config=cfg.__dict__, ms=ms, **({"error": err} if err else {})))
        if ms is not None and (best is None or ms < best[0]):
            best = (ms, cfg)
    return best


def main(argv: list[str] | None = None) -> int:
    import triton.testing

    from lora_engine.format import packed_4bit
    from lora_engine.kernels.configs import GEMV_MAX_TOKENS
    from lora_engine.kernels.lora_gemv import lora_gemv_4bit
    from lora_engine.kernels.lora_matmul import lora_matmul

    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__)
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096", "4096x14336"])
    p.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 256, 4096])
    p.add_argument("--weights", nargs="+", default=["4bit", "dense", "gemv"], choices=["4bit", "dense", "gemv"],
                   help="4bit: the fused GEMM; dense: the GEMM on the decoded weight; gemv: the gemv path (M <= 16)")
    p.add_argument("--rep-ms", type=int, default=20)
    args = p.parse_args(argv)
    rows = []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        for m in args.m:
            t = make_inputs(n, k, m)
            packed = packed_4bit(t.weight, t.weight.quant_state)
            left = (t.x.float() @ t.lora_A.float().t()).contiguous()
            cublas = triton.testing.do_bench(lambda: t.x @ t.dense.t(), rep=args.rep_ms)
            for kind in args.weights:
                row = dict(N=n, K=k, M=m, weight=kind, cublas_ms=cublas)
                if kind == "gemv":
                    if m > GEMV_MAX_TOKENS:
                        continue

                    def call(cfg):
                        return lora_gemv_4bit(t.x, packed, right=t.lora_B, left=left, scaling=2.0, config=cfg)

                    best = _sweep(gemv_candidates(m, t.lora_B.shape[1]), call, args.rep_ms, row, rows)
                else:
                    weight = packed if kind == "4bit" else t.dense

                    def call(cfg, weight=weight):
                        return lora_matmul(t.x, weight, weight_out_by_in=True, right=t.lora_B, left=left,
                                           scaling=2.0, config=cfg)  # fmt: skip

                    best = _sweep(candidates(m), call, args.rep_ms, row, rows)
                if best:
                    print(f"{n}x{k} M={m:5d} {kind:5s}: best {best[0] * 1e3:8.1f} us (cuBLAS dense {cublas * 1e3:8.1f} us)"
                          f"  {best[1]}", flush=True)  # fmt: skip
    env = environment()
    out = results_dir(env["gpu"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_matmul.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m bench.tune``: sweep the GEMM and GEMV kernels' tile configs per regime and report the fastest.

For each shape and M, times ``lora_matmul`` (forward orientation, LoRA epilogue) over candidate
``MatmulConfig``s on the packed 4-bit weight (the fused path) and on the decoded weight (the GEMM of the
dequant path), and, for M <= 16, ``lora_gemv_4bit`` (the gemv path) over candidate ``GemvConfig``s (each code
lookup, each K split the weight allows, a few tiles: ``gemv_candidates``), next to cuBLAS on the decoded weight.
Prints the fastest config of each case (for the GEMV also the fastest of each lookup and the dispatcher's
default) and writes every candidate's time, with the GPU, library versions and date, to
``bench/results/<gpu>/tune_matmul.json``, rewritten after each case (an interrupted sweep keeps what it timed).

    python -m bench.tune --weights gemv --m 1 4 16        # the GEMV variants alone, Llama-3-8B projections

The output is a report, not an input: nothing reads it at run time. The tiles the kernels use are the
hand-written ones in ``lora_engine.kernels.configs`` (``kernels/configs.py``); to adopt a winner, edit the
tiles of its regime there and cite the measurement beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
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


# The GEMV sweep: per-step products of m_pad x BLOCK_N x BLOCK_K fp32 values (register pressure; 8 warps for the
# largest), three K steps, every lookup, and K split into up to 32 parts (a part is a whole number of K steps and
# quantization blocks, so long steps allow fewer parts). At most 9 tiles x 3 lookups x 6 splits = 162 configs per
# shape and M: 123 to 135 at K = 4096 and 144 to 162 at K = 14336 (blocksize 64, M = 1 to 16), so the three
# Llama-3-8B projections at M = 1, 4 and 16 time about 1250 configs (about 160 compilations: K and the
# split count are runtime arguments).
GEMV_STEP_VALUES = (4096, 8192, 16384)
GEMV_BLOCK_K = (128, 256, 512)
GEMV_SPLIT_K = (1, 2, 4, 8, 16, 32)


def gemv_candidates(m: int, rank: int, k: int, blocksize: int):
    """``GemvConfig``s to time at M = ``m`` over a weight of ``k`` columns: the dispatcher's default first, then
    the sweep above, leaving out a config that runs as one already listed (K holds fewer parts than its split_k
    asks for: ``gemv_k_split``)."""
    from lora_engine.kernels.configs import GEMV_LOOKUPS, GemvConfig, gemv_config
    from lora_engine.kernels.lora_gemv import gemv_k_split

    default = gemv_config(m, rank)
    yield default
    seen = {dataclasses.replace(default, split_k=gemv_k_split(k, blocksize, default)[1])}  # configs as they run
    for values, block_k, lookup, split_k in itertools.product(GEMV_STEP_VALUES, GEMV_BLOCK_K, GEMV_LOOKUPS,
                                                              GEMV_SPLIT_K):  # fmt: skip
        block_n = values // (default.m_pad * block_k)
        if block_n < 1:
            continue
        cfg = GemvConfig(m_pad=default.m_pad, block_n=block_n, block_k=block_k, block_r=default.block_r,
                         num_warps=8 if values >= 16384 else 4, num_stages=default.num_stages, lookup=lookup,
                         split_k=split_k)  # fmt: skip
        runs_as = dataclasses.replace(cfg, split_k=gemv_k_split(k, blocksize, cfg)[1])
        if runs_as not in seen:
            seen.add(runs_as)
            yield cfg


def _sweep(candidates, call, rep_ms: int, row: dict, rows: list):
    """Time ``call(cfg)`` for each candidate; append a row each; return [(ms, config)] of those that ran, fastest
    first."""
    import triton.testing

    timed = []
    for cfg in candidates:
        try:
            call(cfg)
            ms, err = triton.testing.do_bench(lambda cfg=cfg: call(cfg), rep=rep_ms), None
        except Exception as exc:  # configs that overflow shared memory or registers
            ms, err = None, type(exc).__name__
        rows.append(dict(row, config=cfg.__dict__, ms=ms, **({"error": err} if err else {})))
        if ms is not None:
            timed.append((ms, cfg))
    return sorted(timed, key=lambda t: t[0])


def _gemv_summary(timed: list, default) -> str:
    """The dispatcher's default and the fastest config of each lookup, with its K split."""
    parts = [f"default {ms * 1e3:.1f} us" for ms, cfg in timed if cfg == default][:1]
    for lookup in dict.fromkeys(cfg.lookup for _, cfg in timed):
        ms, cfg = next((ms, cfg) for ms, cfg in timed if cfg.lookup == lookup)
        parts.append(f"{lookup} {ms * 1e3:.1f} us (split_k {cfg.split_k}, {cfg.block_n}x{cfg.block_k})")
    return "; ".join(parts)


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
    env = environment()
    path = results_dir(env["gpu"]) / "tune_matmul.json"
    path.parent.mkdir(parents=True, exist_ok=True)
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

                    configs = list(gemv_candidates(m, t.lora_B.shape[1], k, packed.blocksize))
                    print(f"{n}x{k} M={m:5d} gemv : timing {len(configs)} configs", flush=True)
                    timed = _sweep(configs, call, args.rep_ms, row, rows)
                    if timed:
                        print(f"{n}x{k} M={m:5d} gemv : {_gemv_summary(timed, configs[0])}", flush=True)
                else:
                    weight = packed if kind == "4bit" else t.dense

                    def call(cfg, weight=weight):
                        return lora_matmul(t.x, weight, weight_out_by_in=True, right=t.lora_B, left=left,
                                           scaling=2.0, config=cfg)  # fmt: skip

                    timed = _sweep(candidates(m), call, args.rep_ms, row, rows)
                if timed:
                    ms, cfg = timed[0]
                    print(f"{n}x{k} M={m:5d} {kind:5s}: best {ms * 1e3:8.1f} us (cuBLAS dense {cublas * 1e3:8.1f} us)"
                          f"  {cfg}", flush=True)  # fmt: skip
                # after every case, so that an interrupted sweep keeps what it timed
                path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m bench``: our layer against the anchors, one table.

On a GPU: every provider (see ``bench/providers.py``) on the projections of real models, in the modes fwd,
fwdbwd and decode, over M from 1 to 16384, each timed eagerly and replayed from a CUDA graph, the providers of a
case interleaved over a few rounds (see ``bench/measure.py``); writes ``bench/results/<gpu>/layer.{json,md}``,
``layer.png`` (ms per call) and ``layer_vs_dense.png`` (speed relative to dense bf16).
On a CPU: a small correctness-and-timing table of the torch reference and the Triton kernels run by the
interpreter. CPU timings say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from .providers import ALL_PROVIDERS, DEFAULT_PROVIDERS, MODES, PROVIDER_GROUPS, expand_providers, unavailable
    from .shapes import ANCHOR_PROJECTIONS, M_DECODE, M_MIDDLE, M_TRAIN, MODELS

    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["llama3-8b"], choices=list(MODELS), help="shape registry entries")
    p.add_argument("--projections", nargs="+", default=list(ANCHOR_PROJECTIONS),
                   help="which projections of each model ('all' for every one); default: the anchors' "
                   "three")  # fmt: skip
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    groups = "; ".join(f"{name} = {' '.join(members)}" for name, members in PROVIDER_GROUPS.items())
    p.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS),
                   choices=[*ALL_PROVIDERS, *PROVIDER_GROUPS], metavar="PROVIDER",
                   help=f"any of {', '.join(ALL_PROVIDERS)} (bench/providers.py), or a group of them: "
                   f"{groups}")  # fmt: skip
    p.add_argument("--m-train", nargs="+", type=int, default=[*M_MIDDLE, *M_TRAIN], help="M for fwd and fwdbwd")
    p.add_argument("--m-decode", nargs="+", type=int, default=list(M_DECODE), help="M for decode")
    p.add_argument("--rep-ms", type=int, default=100,
                   help="measured time per provider, case and kind (eager, device), split over the rounds")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds over the providers of a case (at least 2: drift between them is flagged)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<gpu>)")
    p.add_argument("--stem", default="layer", help="file name stem of the results (<stem>.json, .md, .png)")
    p.add_argument("--cpu", action="store_true", help="the CPU table even where a GPU is present")
    args = p.parse_args(argv)
    args.providers = expand_providers(args.providers)
    if args.projections == ["all"]:
        args.projections = None
    if args.rounds < 2:
        p.error("--rounds takes at least 2: each cell is measured twice or more to detect drift")
    for provider in args.providers:
        reason = unavailable(provider)
        if reason is not None:
            p.error(reason)
    return args


def run_gpu(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from . import measure, report
    from .providers import build, make_inputs
    from .shapes import layer_shapes

    env = {**measure.environment(), "rounds": args.rounds}
    shapes = layer_shapes(args.models, args.projections)
    cases = [(s, mode, m) for s in shapes for mode in args.modes
             for m in (args.m_decode if mode == "decode" else args.m_train)]  # fmt: skip
    records: list[dict] = []
    out = args.out or measure.results_dir(env["gpu"])
    bar = tqdm(cases, unit="case", dynamic_ncols=True)
    for (model, proj, n, k), mode, m in bar:
        bar.set_description(f"{mode} {n}x{k} M={m}")
        inputs = make_inputs(n, k, m)
        case = {"gpu": env["gpu"], "model": model, "proj": proj, "N": n, "K": k, "M": m, "mode": mode}
        found: dict[str, dict] = {}
        cells: dict[str, measure.Cell] = {}
        for provider in args.providers:  # build, warm up and capture every provider before timing any
            record = {**case, "provider": provider, "median_ms": None}
            try:
                run = build(provider, inputs, mode)
                if run is None:
                    continue  # the provider does not apply to this case
                run.fn()  # compile and warm up outside the timing
                record["peak_mib"] = round(measure.peak_extra_mib(run), 2)
                cells[provider] = measure.prepare(run, args.rep_ms, args.rounds)
            except Exception as exc:  # one provider failing (e.g. out of memory) must not end the run
                record["error"] = measure.describe(exc)
                torch.cuda.empty_cache()
            found[provider] = record
        measure.measure_case(cells, args.rounds)
        for provider, cell in cells.items():
            if cell.error is not None:
                found[provider]["error"] = cell.error
            else:
                found[provider].update(measure.timing_fields(cell, measure.layer_flops(n, k, m, mode),
                                                             inputs.weight_bytes))  # fmt: skip
        records += found.values()
        del cells, inputs
        torch.cuda.empty_cache()
        report.write(records, env, out, args.stem, with_plot=False)  # partial results survive an interrupted run
    bar.close()
    for path in report.write(records, env, out, args.stem):
        print(f"wrote {path}")
    print(report.markdown(records, env))
    return 1 if any("error" in r for r in records) else 0


def run_cpu() -> int:
    """Correctness and wall time of the reference and of each interpreted kernel path on one small layer.

    Needs the interpreter (``TRITON_INTERPRET=1``), set by :func:`main` before anything imports Triton.
    """
    import time

    import torch

    import lora_engine
    from lora_engine import reference
    from lora_engine.format import quantize_weight

    n, k, m, rank = 96, 200, 33, 8
    torch.manual_seed(0)
    weight = quantize_weight(torch.randn(n, k) * 0.1, "nf4", 64, True)
    x, lora_A, lora_B, dy = torch.randn(m, k), torch.randn(rank, k) * 0.1, torch.randn(n, rank) * 0.1, torch.randn(m, n)
    state = weight.quant_state

    def run(backend: str, path: str | None, dtype: torch.dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, lora_A, lora_B)]
        start = time.perf_counter()
        with lora_engine.use_backend(backend), lora_engine.force_path(path):
            y = lora_engine.lora_linear_4bit(leaves[0], weight, state, leaves[1], leaves[2], 2.0)
            y.backward(dy.to(dtype))
        return [y, *(t.grad for t in leaves)], time.perf_counter() - start

    leaves64 = [t.double().requires_grad_() for t in (x, lora_A, lora_B)]
    w64 = reference.dequantize_4bit(weight, state, torch.float64)
    y64 = leaves64[0] @ w64.t() + 2.0 * (leaves64[0] @ leaves64[1].t()) @ leaves64[2].t()
    y64.backward(dy.double())
    exact = [y64, *(t.grad for t in leaves64)]

    print(f"lora_engine {lora_engine.__version__} on CPU: one layer N={n} K={k} M={m} r={rank}, NF4 + double quant,")
    print("forward + backward; error = max |result - float64| over y, dx, dA, dB.")
    print("No GPU here: the Triton rows run in Triton's CPU interpreter; these timings say nothing about speed.\n")
    print(f"| {'implementation':<36} | {'dtype':<8} | {'max error':>10} | {'wall s':>8} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 12}|{'-' * 10}|")
    worst = 0.0
    # the gemv path serves at most 16 tokens over row-aligned blocks: not this layer (its tests cover it)
    paths = [p for p in lora_engine.dispatch.PATHS if p != "gemv"]
    rows = [("torch", None, torch.float32)]
    rows += [("triton", p, dt) for p in paths for dt in (torch.float32, torch.float16)]
    for backend, path, dtype in rows:
        results, seconds = run(backend, path, dtype)
        err = max(
            (r.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-12) for r, e in zip(results, exact)
        )
        worst = max(worst, err if dtype == torch.float32 else 0.0)
        label = "torch reference" if backend == "torch" else f"triton interpreter, {path}"
        print(f"| {label:<36} | {str(dtype)[6:]:<8} | {err:>10.2e} | {seconds:>8.2f} |")
    print("\n(error relative to max |float64|; fp16 rows carry fp16 rounding.) Run on a CUDA GPU for the speed table.")
    return 0 if worst < 1e-4 else 1


def _wants_cpu_table(argv: list[str]) -> bool:
    """Whether this run prints the CPU table, decided before anything imports Triton (importing torch does not)."""
    import torch

    return "--cpu" in argv or not torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cpu = _wants_cpu_table(argv)
    if cpu:
        # Triton fixes its mode when first imported, and the providers import PEFT and bitsandbytes, which import
        # it: the interpreter must be asked for before parsing the arguments.
        from lora_engine.kernels.runtime import ENV_VAR

        os.environ.setdefault(ENV_VAR, "1")
    args = _parse(argv)
    return run_cpu() if cpu else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())

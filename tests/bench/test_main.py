"""``python -m bench``, the README's main job, runs its CPU table: every path agrees with float64."""

import pytest

from bench.__main__ import main

pytestmark = pytest.mark.interpreter


def test_cpu_table_runs_and_every_path_is_accurate(capsys):
    assert main(["--cpu"]) == 0, "an fp32 row strayed from float64 by more than 1e-4 (relative)"
    table = capsys.readouterr().out
    for path in ("fused", "dequant", "dequant_cublas"):
        assert f"triton interpreter, {path}" in table
    assert "torch reference" in table and "say nothing about speed" in table

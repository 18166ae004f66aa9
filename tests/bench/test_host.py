"""``python -m bench.host`` prints host µs per call per path (in its own process: it replaces the launches)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.interpreter


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the default is real launches, timed in gpu_check")
def test_host_table_with_stubbed_launches():
    env = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    command = [sys.executable, "-m", "bench.host", "--paths", "dequant", "gemv", "--m", "1", "32", "--calls", "50",
               "--repeats", "3"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| dequant") or line.startswith("| gemv")]
    assert len(rows) == 3, done.stdout  # gemv serves at most 16 tokens: no M = 32 row
    for row in rows:
        fwd, both = (float(cell) for cell in row.strip("| ").split("|")[2:4])
        assert 0 < fwd < both, row  # best of 3 x 50 calls: a backward more always shows, even on a busy host
    assert "launches stub" in done.stdout

"""``python -m bench.host`` prints host µs per call per path, a table per layer (in its own process: it replaces the
launches)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.interpreter


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the default is real launches, timed in gpu_check")
def test_host_table_with_stubbed_launches(clean_env):
    command = [sys.executable, "-m", "bench.host", "--paths", "dequant", "gemv", "--m", "1", "32", "--calls", "50",
               "--repeats", "3"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=clean_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tables = done.stdout.split("host µs per call, ")[1:]
    assert len(tables) == 2, done.stdout
    assert tables[0].startswith("lora_engine.lora_linear_4bit,") and tables[1].startswith("PEFT lora.Linear4bit")
    for table in tables:
        rows = [line for line in table.splitlines() if line.startswith("| dequant") or line.startswith("| gemv")]
        assert len(rows) == 3, done.stdout  # gemv serves at most 16 tokens: no M = 32 row
        for row in rows:
            fwd, both = (float(cell) for cell in row.strip("| ").split("|")[2:4])
            # both measured; their order is not asserted: on a shared host a load spike can invert any two timings
            assert 0 < fwd < float("inf") and 0 < both < float("inf"), row
        assert "launches stub" in table.splitlines()[0]

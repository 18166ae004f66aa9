"""``python -m bench.e2e`` runs end to end (``--tiny`` on the CPU: toy sizes, so the script is known to work before
GPU time is spent on it) and writes stock and patched rows side by side."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "extra",
    [["--model", "qwen2.5-7b", "--targets", "qv"], ["--method", "prefix"], ["--group-projections"],
     ["--method", "dora", "--lora-dropout", "0.05"]],
    ids=["qwen2-lora-qv", "prefix", "grouped", "dora"],
)
def test_tiny_run_writes_stock_and_patched_rows(tmp_path, extra, clean_env):
    command = [sys.executable, "-m", "bench.e2e", "--tiny", "--device", "cpu", "--batch", "2", "--seq", "8",
               "--steps", "1", "--rounds", "2", "--out", str(tmp_path), *extra]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=clean_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("e2e-tiny-2l-*.json")
    record = json.loads(path.read_text())
    grouped = ["lora_engine grouped"] if "--group-projections" in extra else []
    assert [r["row"] for r in record["rows"]] == ["stock PEFT", "lora_engine", *grouped]
    for row in record["rows"]:
        assert len(row["round_step_s"]) == 2 and row["tokens_per_s"] > 0 and len(row["losses"]) == 2
    assert "lora_engine" in record["rows"][1]["patch_report"] and record["torch"] and "date" in record
    if grouped:
        assert "projection groups" in record["rows"][2]["patch_report"]
    assert "lora_engine / stock PEFT:" in done.stdout

"""``python -m bench``, the README's main job, as a user types it: a new process with a clean environment.

The test process itself runs with ``TRITON_INTERPRET=1`` set by conftest before anything was imported, which
would hide a main job that asks for the interpreter too late; the subprocess starts without it.
"""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.interpreter


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the main job runs the speed table")
def test_main_job_prints_the_cpu_table_in_a_clean_environment(clean_env):
    done = subprocess.run(
        [sys.executable, "-m", "bench"], cwd=ROOT, env=clean_env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    table = done.stdout
    for path in ("fused", "dequant", "dequant_cublas"):
        assert f"triton interpreter, {path}" in table, table
    assert "torch reference" in table and "say nothing about speed" in table


def test_main_job_help_needs_no_gpu(clean_env):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=ROOT, env=clean_env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--providers" in done.stdout


def test_the_documented_adapter_kinds_command_parses():
    from bench import providers
    from bench.__main__ import _parse

    prefix = "python -m bench --providers kinds "
    command = next(line.strip() for line in providers.__doc__.splitlines() if line.strip().startswith(prefix))
    assert command in (ROOT / "README.md").read_text(), "the README shows the command bench/providers.py documents"
    args = _parse(shlex.split(command)[3:])
    group = list(providers.PROVIDER_GROUPS["kinds"])
    assert args.providers == group and set(providers.KIND_PROVIDERS) <= set(group)
    assert {b for _, b, _ in providers.KIND_RATIOS} <= set(group), "every kind's baseline is measured beside it"
    assert (args.modes, args.m_decode, args.m_train, args.stem) == (["decode", "fwd", "fwdbwd"], [16], [256, 8192],
                                                                    "kinds")  # fmt: skip
    spelled_out = _parse(["--providers", *group, "dequant_cublas", "kinds"])
    assert spelled_out.providers == [*group, "dequant_cublas"], "a group expands in place, each provider once"
    assert "lora_engine_multi8" not in _parse([]).providers, "the default set stays the LoRA layer's"
    with pytest.raises(SystemExit):
        _parse(["--providers", "kinds8"])

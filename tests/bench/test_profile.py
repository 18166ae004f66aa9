"""``python -m bench.profile`` (CUDA only) builds its cases and lists every kernel module; checked on CPU, where
building a provider runs no kernel."""

import importlib
import pkgutil

import lora_engine.kernels
import torch
from lora_engine.kernels.configs import GEMV_MAX_TOKENS

from bench.profile import KERNEL_MODULES, cases, parse_args


def test_every_kernel_module_is_listed():
    launching = set()
    for info in pkgutil.iter_modules(lora_engine.kernels.__path__):
        module = importlib.import_module(f"lora_engine.kernels.{info.name}")
        if any(name.startswith("_") and name.endswith("_kernel") for name in dir(module)):
            launching.add(info.name)
    assert "lora_gemv" in launching, "the discovery above found no kernel modules"
    assert set(KERNEL_MODULES) == launching


def test_cases_cover_the_gemv_path_where_it_applies():
    assert "lora_engine[gemv]" in parse_args([]).providers
    m_gemv, m_over = 1, GEMV_MAX_TOKENS + 1
    argv = ["--shape", "40", "128", "--m", str(m_gemv), str(m_over), "--modes", "fwd", "fwdbwd",
            "--providers", "lora_engine[gemv]", "lora_engine[dequant]"]  # fmt: skip
    built = {label: run for label, run in cases(parse_args(argv), dtype=torch.float32, device="cpu")}
    assert len(built) == 2 * 2 * 2
    for label, run in built.items():
        applies = "[gemv]" not in label or label.endswith(f"M={m_gemv}")
        assert (run is not None) == applies, label

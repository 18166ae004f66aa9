"""Backend selection: "triton" really runs the kernels, "torch" never does, "auto" follows the device."""

import importlib.util
import logging
import sys
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch

import lora_engine
import lora_engine.autograd
import lora_engine.kernels.lora_matmul
from lora_engine import dispatch, reference


def _operands(device="cpu"):
    torch.manual_seed(0)
    packed, state = bnbF.quantize_4bit(torch.randn(37, 100, device=device), blocksize=64, quant_type="nf4")
    return (torch.randn(5, 100, device=device), packed, state, torch.randn(8, 100, device=device),
            torch.randn(37, 8, device=device))  # fmt: skip


def _count_kernel_launches(monkeypatch):
    """Count launches of the GEMM kernel itself (not just its Python launcher)."""
    kernel = lora_engine.kernels.lora_matmul._lora_matmul_kernel
    launches = []
    original = type(kernel).__getitem__

    def counting_getitem(self, grid):
        if self is kernel:
            launches.append(grid)
        return original(self, grid)

    monkeypatch.setattr(type(kernel), "__getitem__", counting_getitem)
    return launches


@pytest.mark.interpreter
def test_triton_backend_runs_the_triton_kernels(monkeypatch, kernel_device):
    launches = _count_kernel_launches(monkeypatch)

    def no_reference(*args, **kwargs):
        raise AssertionError("the torch reference ran under backend 'triton'")

    monkeypatch.setattr(reference, "lora_linear_4bit", no_reference)
    x, packed, state, lora_A, lora_B = _operands(kernel_device)
    x.requires_grad_()
    with lora_engine.use_backend("triton"):
        y = lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)
        y.sum().backward()
    assert len(launches) == 2, "one GEMM launch forward, one for the input gradient"
    assert x.grad is not None


def test_torch_backend_never_launches_kernels(monkeypatch):
    launches = _count_kernel_launches(monkeypatch)
    x, packed, state, lora_A, lora_B = _operands()
    with lora_engine.use_backend("torch"):
        y = lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)
    assert not launches
    torch.testing.assert_close(y, reference.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0))


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, packed, state, lora_A, lora_B = _operands()
    with lora_engine.use_backend("triton"), pytest.raises(RuntimeError, match="Triton cannot run on cpu tensors"):
        lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)


def test_auto_uses_the_reference_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    launches = _count_kernel_launches(monkeypatch)
    x, packed, state, lora_A, lora_B = _operands()
    with lora_engine.use_backend("auto"):
        lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)
    assert not launches


def test_backend_and_path_names_are_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_engine.set_backend("cuda")
    with pytest.raises(ValueError, match="path must be one of"):
        with lora_engine.force_path("tiled"):
            pass
    assert lora_engine.get_backend() == "auto"


def test_path_threshold_and_forcing():
    small, large = dispatch.choose_path(16, 4096, 4096), dispatch.choose_path(8192, 4096, 4096)
    assert (small, large) == ("dequant", "dequant_cublas")
    with lora_engine.force_path("fused"):
        assert dispatch.choose_path(8192, 4096, 4096) == "fused"


def test_path_tables_are_well_formed():
    for steps in [dispatch.DEFAULT_PATH_STEPS, *dispatch.PATH_STEPS.values()]:
        thresholds = [t for t, _ in steps]
        assert thresholds[0] == 0 and thresholds == sorted(set(thresholds)), steps
        assert all(path in dispatch.PATHS for _, path in steps), steps


def test_fallbacks_are_reported_once(caplog):
    with caplog.at_level(logging.WARNING, logger="lora_engine"):
        dispatch.report_once("test-key", "fallback happened")
        dispatch.report_once("test-key", "fallback happened")
    assert [r.getMessage() for r in caplog.records].count("fallback happened") == 1


def test_no_top_level_kernels_package():
    """kernels/ is lora_engine.kernels; nothing may make it importable as Hugging Face's `kernels`."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    import_utils.is_kernels_available()
    repo_kernels = Path(lora_engine.kernels.lora_matmul.__file__).parent
    module = sys.modules.get("kernels")
    assert module is None or Path(getattr(module, "__file__", "") or "").parent != repo_kernels
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin or "").parent != repo_kernels

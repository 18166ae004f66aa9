"""Backend selection: "triton" really runs the kernels, "torch" never does, "auto" follows the device and dtype;
settings are scoped per thread; kernels launch under the input's device; the interpreter mode is one decision."""

import importlib.util
import logging
import subprocess
import sys
import threading
from pathlib import Path

import bitsandbytes.functional as bnbF
import lora_engine.kernels.lora_matmul
import pytest
import torch
from lora_engine.kernels import runtime

import lora_engine
import lora_engine.autograd
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


@pytest.fixture
def without_interpreter(monkeypatch):
    """As if the kernels had been loaded compiled for a GPU: CPU tensors cannot run them."""
    monkeypatch.setattr(runtime, "_settled", False)


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(without_interpreter):
    x, packed, state, lora_A, lora_B = _operands()
    with lora_engine.use_backend("triton"), pytest.raises(RuntimeError, match="Triton cannot run on cpu tensors"):
        lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)


def test_auto_uses_the_reference_on_cpu_without_the_interpreter(monkeypatch, without_interpreter):
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


def test_a_step_applies_from_its_token_count_on(monkeypatch):
    """(min_tokens, path): min_tokens itself takes the step's path, one token fewer the step before."""
    monkeypatch.setattr(dispatch, "DEFAULT_PATH_STEPS", ((0, "dequant"), (5, "gemv"), (9, "dequant_cublas")))
    monkeypatch.setattr(dispatch, "DEFAULT_BASE_PATH_STEPS", ((0, "fused"), (3, "dequant")))
    got = [dispatch.choose_path(m, 64, 64) for m in range(11)]
    assert got == ["dequant"] * 5 + ["gemv"] * 4 + ["dequant_cublas"] * 2
    assert [dispatch.choose_path(m, 64, 64, base_only=True) for m in range(5)] == ["fused"] * 3 + ["dequant"] * 2


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


# ------------------------------------------------------------------------------------- bf16 in the interpreter


@pytest.mark.interpreter
@pytest.mark.skipif(not runtime.interpreter_active(), reason="bf16 is exact on a GPU; the rule is the interpreter's")
def test_bf16_in_the_interpreter_runs_the_reference_and_says_so(monkeypatch, caplog):
    """The interpreter computes bf16 on raw bits (garbage of ~1e10): "auto" takes the reference and reports it
    once, "triton" refuses; the module API (compute_dtype=bf16, the README's example) is covered too."""
    monkeypatch.setattr(dispatch, "_reported", set())
    x, packed, state, lora_A, lora_B = _operands()
    x, lora_A, lora_B = (t.to(torch.bfloat16) for t in (x, lora_A, lora_B))
    expected = reference.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)
    with caplog.at_level(logging.WARNING, logger="lora_engine"):
        for _ in range(2):
            y = lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)
            assert torch.equal(y, expected)
    assert [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()] != []
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    with lora_engine.use_backend("triton"), pytest.raises(RuntimeError, match="bfloat16 on CPU"):
        lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)

    torch.manual_seed(1)
    layer = lora_engine.LoRALinear4bit(64, 24, r=4, compute_dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 64)
    with lora_engine.use_backend("torch"):
        expected = layer(x)
    assert torch.equal(layer(x), expected)
    assert expected.abs().max() < 100


# ------------------------------------------------------------------------------------------ scoped settings


def _in_two_threads(first, second):
    """Run ``first(step)`` and ``second(step)`` in two threads that take turns at each ``step()`` (a barrier)."""
    barrier = threading.Barrier(2, timeout=30)
    errors = []

    def run(body):
        try:
            body(barrier.wait)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(body,)) for body in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_use_backend_and_force_path_are_per_thread():
    """Blocks entered and left in interleaved order restore each thread's own value; no thread sees another's."""
    seen = {}

    def first(step):
        with lora_engine.use_backend("torch"), lora_engine.force_path("fused"):
            step()  # both threads inside their blocks
            seen["first inside"] = (lora_engine.get_backend(), dispatch.choose_path(8192, 64, 64))
            step()
        step()  # first left, second still inside
        seen["first after"] = (lora_engine.get_backend(), dispatch.choose_path(8192, 64, 64))
        step()

    def second(step):
        seen["second before"] = lora_engine.get_backend()
        with lora_engine.use_backend("triton"), lora_engine.force_path("gemv"):
            step()
            seen["second inside"] = (lora_engine.get_backend(), dispatch.choose_path(8192, 64, 64))
            step()
            step()
            seen["second after first left"] = (lora_engine.get_backend(), dispatch.choose_path(8192, 64, 64))
        step()

    _in_two_threads(first, second)
    assert seen == {
        "second before": "auto",
        "first inside": ("torch", "fused"),
        "second inside": ("triton", "gemv"),
        "first after": ("auto", "dequant_cublas"),
        "second after first left": ("triton", "gemv"),
    }
    assert lora_engine.get_backend() == "auto" and dispatch.choose_path(8192, 64, 64) == "dequant_cublas"


def test_one_threads_backend_does_not_make_another_raise(without_interpreter):
    """Backend "triton" in one thread (which raises on CPU tensors without the interpreter) leaves another
    thread on the process default."""
    x, packed, state, lora_A, lora_B = _operands()
    results = {}

    def strict(step):
        with lora_engine.use_backend("triton"):
            step()
            with pytest.raises(RuntimeError, match="Triton cannot run on cpu tensors"):
                lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)
            step()

    def default(step):
        step()
        results["y"] = lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)
        step()

    _in_two_threads(strict, default)
    torch.testing.assert_close(results["y"], reference.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0))


def test_set_backend_is_the_process_default_under_scoped_blocks():
    try:
        lora_engine.set_backend("torch")
        seen = []
        worker = threading.Thread(target=lambda: seen.append(lora_engine.get_backend()))
        worker.start()
        worker.join()
        assert seen == ["torch"], "a new thread starts from the process default"
        with lora_engine.use_backend("auto"):
            assert lora_engine.get_backend() == "auto"
        assert lora_engine.get_backend() == "torch"
    finally:
        lora_engine.set_backend("auto")


# ------------------------------------------------------------------------------------------------- devices


def test_device_guard_makes_the_tensors_device_current():
    guard = dispatch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(dispatch.device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.interpreter
def test_kernels_launch_under_the_inputs_device(monkeypatch, kernel_device):
    """Every kernel launch of a forward and backward happens inside a guard for the input's device."""
    entered = []
    inside = [0]
    original_guard = dispatch.device_guard

    class Recording:
        def __init__(self, device):
            entered.append(torch.device(device))
            self.inner = original_guard(device)

        def __enter__(self):
            inside[0] += 1
            return self.inner.__enter__()

        def __exit__(self, *exc):
            inside[0] -= 1
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(dispatch, "device_guard", Recording)
    outside = []
    for kernel in (lora_engine.kernels.lora_matmul._lora_matmul_kernel,):
        original = type(kernel).__getitem__

        def checking_getitem(self, grid, original=original):
            if not inside[0]:
                outside.append(self)
            return original(self, grid)

        monkeypatch.setattr(type(kernel), "__getitem__", checking_getitem)
    x, packed, state, lora_A, lora_B = _operands(kernel_device)
    x.requires_grad_()
    for path in ("dequant", "fused", "dequant_cublas"):
        with lora_engine.force_path(path):
            lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0).sum().backward()
    assert not outside, "a kernel launched outside the device guard"
    assert entered and all(d == x.device for d in entered)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_layer_on_a_second_gpu_runs_there():
    """A layer whose tensors live on cuda:1 gives the right answer while cuda:0 is current (device_map="auto")."""
    torch.cuda.set_device(0)
    x, packed, state, lora_A, lora_B = _operands("cuda:1")
    x.requires_grad_()
    y = lora_engine.lora_linear_4bit(x, packed, state, lora_A, lora_B, 2.0)
    y.sum().backward()
    with lora_engine.use_backend("torch"):
        x_ref = x.detach().clone().requires_grad_()
        y_ref = lora_engine.lora_linear_4bit(x_ref, packed, state, lora_A, lora_B, 2.0)
        y_ref.sum().backward()
    assert y.device == torch.device("cuda", 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- the interpreter mode


def _run_clean(code: str, clean_env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -c code`` in ``clean_env`` (the fixture: TRITON_INTERPRET not set)."""
    return subprocess.run(
        [sys.executable, "-c", code], env=clean_env, capture_output=True, text=True, timeout=600, cwd="/"
    )


def test_importing_lora_engine_does_not_import_triton(clean_env):
    """So TRITON_INTERPRET may still be set after importing lora_engine (Triton fixes its mode on import)."""
    code = "import sys, lora_engine; print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))"
    done = _run_clean(code, clean_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_interpreter_set_after_triton_was_imported_is_a_clear_error(clean_env):
    """Triton's own functions were compiled for the GPU: the first call says why and how to fix it."""
    code = """
import os, torch
import triton.language  # as torch.compile, bitsandbytes or PEFT would, before the variable is set
os.environ["TRITON_INTERPRET"] = "1"
import bitsandbytes.functional as bnbF, lora_engine
packed, state = bnbF.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4")
try:
    lora_engine.lora_linear_4bit(torch.randn(2, 64), packed, state, torch.randn(4, 64), torch.randn(8, 4), 1.0)
except RuntimeError as exc:
    print(exc)
"""
    done = _run_clean(code, clean_env)
    assert done.returncode == 0, done.stderr
    assert "TRITON_INTERPRET is set now but was unset when Triton was first imported" in done.stdout, done.stdout
    assert "before importing anything" in done.stdout


def test_constant_marker_is_the_one_torch_compile_reads():
    """lora_engine marks its setting and device queries constant for torch.compile without importing
    torch._dynamo at import time, by setting the attribute ``torch.compiler.assume_constant_result`` sets."""

    def query() -> int:
        return 1

    torch.compiler.assume_constant_result(query)
    assert vars(query) == {"_dynamo_marked_constant": True}
    assert dispatch._scoped_settings._dynamo_marked_constant is True
    assert dispatch._capability._dynamo_marked_constant is True

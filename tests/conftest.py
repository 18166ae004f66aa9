"""Shared test setup.

Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before
Triton is imported, so it is defaulted here (conftest runs before any test module imports lora_engine).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DEVICE = "cuda" if HAS_CUDA and not INTERPRETER else "cpu"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def pytest_collection_modifyitems(config, items):
    can_run_kernels = HAS_TRITON and (KERNEL_DEVICE == "cuda" or INTERPRETER)
    skip_kernels = pytest.mark.skip(reason="needs Triton with CUDA, or TRITON_INTERPRET=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (bf16 kernels, CUDA graphs, speed)")
    for item in items:
        if "interpreter" in item.keywords and not can_run_kernels:
            item.add_marker(skip_kernels)
        if "gpu" in item.keywords and KERNEL_DEVICE != "cuda":
            item.add_marker(skip_gpu)


# What a subprocess run as a new user keeps from this environment: where programs, the home folder and temporary
# files are, and where the compile caches go (CI points them into a folder it removes afterwards).
CLEAN_ENV_KEYS = ("PATH", "HOME", "TMPDIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment of a subprocess started as a new user starts it: nothing preset but ``CLEAN_ENV_KEYS``."""
    return {key: os.environ[key] for key in CLEAN_ENV_KEYS if key in os.environ}


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton kernels run: the GPU, or the CPU interpreter."""
    return KERNEL_DEVICE

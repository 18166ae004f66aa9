"""Benchmarks of lora_engine's layer against the anchors (bitsandbytes + PEFT, decode + cuBLAS, dense bf16).

``python -m bench`` runs the layer benchmark (see ``bench/__main__.py``), ``python -m bench.e2e`` one QLoRA
training step of a whole model, and ``pytest bench/`` the pytest-benchmark files.
"""

import os
import sys

# `python -m bench` puts the repository root on sys.path, where the folder `kernels/` (installed as
# lora_engine.kernels) would shadow Hugging Face's `kernels` package that transformers probes for.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]

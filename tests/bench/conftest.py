"""Make the repository's ``bench`` package importable without leaving the repository root on sys.path
(its ``kernels/`` folder must not shadow Hugging Face's ``kernels``; ``bench/__init__`` removes the root again)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import bench  # noqa: E402,F401

"""lora_engine: fused 4-bit (bitsandbytes NF4/FP4) + LoRA layers for QLoRA training and LoRA inference.

    y = x·deq(W)ᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias      (W frozen, A and B trained)

Triton kernels run the forward and all gradients; ``lora_engine.reference`` is the pure-torch definition of
correctness and the path taken on CPU-only machines.
"""

from . import reference
from .dispatch import force_path, get_backend, set_backend, use_backend
from .functional import dequantize_4bit, lora_linear, lora_linear_4bit
from .modules import LoRALinear, LoRALinear4bit

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "LoRALinear4bit",
    "dequantize_4bit",
    "force_path",
    "get_backend",
    "lora_linear",
    "lora_linear_4bit",
    "reference",
    "set_backend",
    "use_backend",
]

"""lora_engine: fused 4-bit (bitsandbytes NF4/FP4) + LoRA layers for QLoRA training and LoRA inference.

    y = x·deq(W)ᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias      (W frozen, A and B trained)

Triton kernels run the forward and all gradients; ``lora_engine.reference`` is the pure-torch definition of
correctness and the path taken on CPU-only machines.
"""

import importlib
from typing import TYPE_CHECKING, Any

from . import reference
from .dispatch import force_path, get_backend, set_backend, use_backend
from .functional import (
    dequantize_4bit,
    dora_linear,
    dora_linear_4bit,
    ia3_linear,
    ia3_linear_4bit,
    linear_4bit,
    lora_linear,
    lora_linear_4bit,
    lowrank_linear,
    lowrank_linear_4bit,
    multi_lora_linear_4bit,
)
from .modules import LoRALinear, LoRALinear4bit

__version__ = "0.1.0"

# Integrations load on first use: importing PEFT (and transformers behind it) takes seconds.
_LAZY = {
    "PatchReport": ".integrations.peft",
    "patch_model": ".integrations.peft",
    "patch_peft_model": ".integrations.peft",
    "register_fused_layers": ".integrations.peft",
    "unpatch_model": ".integrations.peft",
    "unpatch_peft_model": ".integrations.peft",
    "delete_adapter": ".integrations.adapters",
    "inject": ".integrations.adapters",
    "load_adapter": ".integrations.adapters",
    "merge_and_unload": ".integrations.adapters",
    "print_trainable_parameters": ".integrations.adapters",
    "save_adapter": ".integrations.adapters",
    "set_adapter": ".integrations.adapters",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .integrations.peft import (
        PatchReport,
        patch_model,
        patch_peft_model,
        register_fused_layers,
        unpatch_model,
        unpatch_peft_model,
    )
    from .integrations.adapters import (
        delete_adapter,
        inject,
        load_adapter,
        merge_and_unload,
        print_trainable_parameters,
        save_adapter,
        set_adapter,
    )

__all__ = [
    "delete_adapter",
    "inject",
    "load_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "LoRALinear",
    "LoRALinear4bit",
    "PatchReport",
    "dequantize_4bit",
    "dora_linear",
    "dora_linear_4bit",
    "force_path",
    "get_backend",
    "ia3_linear",
    "ia3_linear_4bit",
    "linear_4bit",
    "lora_linear",
    "lora_linear_4bit",
    "lowrank_linear",
    "lowrank_linear_4bit",
    "multi_lora_linear_4bit",
    "patch_model",
    "patch_peft_model",
    "reference",
    "register_fused_layers",
    "set_backend",
    "unpatch_model",
    "unpatch_peft_model",
    "use_backend",
]

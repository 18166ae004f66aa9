"""Triton kernels and their launchers, installed as ``lora_engine.kernels``.

Only ``@triton.jit`` kernels and the host functions that check shapes and launch them live here; autograd,
modules and dispatch live in ``lora_engine``. Never import this directory as a top-level ``kernels`` package:
that name belongs to Hugging Face's ``kernels``, which transformers and bitsandbytes probe for.
"""

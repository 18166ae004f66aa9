"""Shared fixtures for the integration tests: a tiny random Llama saved to disk and reloaded in 4 bits, the
way users load a model for QLoRA (``from_pretrained`` with a ``BitsAndBytesConfig``), with PEFT LoRA on it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

# Small enough for the Triton interpreter (one training step takes seconds on two cores) yet shaped like a real
# model: grouped-query attention (k/v project to 32), and an MLP width (96) that 64-element quantization
# blocks do not divide, so blocks straddle rows of down_proj.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A randomly initialised LlamaForCausalLM written with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def load_4bit_llama(path: Path, compute_dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """The model at ``path`` in NF4 with double quantization, as QLoRA recipes load it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    # the unquantized rest (embeddings, norms) in the compute dtype too, as QLoRA recipes load it
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=compute_dtype, device_map={"": device}
    )


def randomize_lora_B(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """PEFT starts lora_B at zero, which makes every lora_A gradient zero; give B values as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture(scope="session")
def load_4bit(tiny_llama_dir) -> Callable[..., torch.nn.Module]:
    """``load(compute_dtype=torch.float32, device="cpu")``: the tiny Llama in 4 bits, without adapters."""
    return lambda compute_dtype=torch.float32, device="cpu": load_4bit_llama(tiny_llama_dir, compute_dtype, device)


@pytest.fixture(scope="session")
def make_peft_llama(tiny_llama_dir) -> Callable[..., torch.nn.Module]:
    """``make(compute_dtype=..., device=..., lora_dropout=..., **lora_config)``: a fresh 4-bit PeftModel with
    LoRA on all linear layers; the same arguments always give the same LoRA weights."""
    from peft import LoraConfig, get_peft_model

    def make(
        compute_dtype: torch.dtype = torch.float32, device: str = "cpu", lora_dropout: float = 0.0, **lora_config
    ) -> torch.nn.Module:
        model = load_4bit_llama(tiny_llama_dir, compute_dtype, device)
        torch.manual_seed(1)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=lora_dropout, **lora_config)
        peft_model = get_peft_model(model, config)
        randomize_lora_B(peft_model)
        return peft_model

    return make


def token_batch(seed: int, batch: int = 2, seq: int = 16, device: str = "cpu") -> torch.Tensor:
    """Random token ids for the tiny Llama."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (batch, seq), generator=gen).to(device)


@pytest.fixture(scope="session")
def tokens() -> Callable[..., torch.Tensor]:
    return token_batch


LR = 1e-2  # AdamW's learning rate in the stock-vs-patched training tests


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters an optimizer trains (the adapter's), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train_steps(model: torch.nn.Module, batches: list[torch.Tensor], lr: float = LR):
    """AdamW over the trainable weights, one step per batch: ``(losses, the first step's gradients by name)``."""
    model.train()
    params = trainable_params(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr)
    losses, first_grads = [], None
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if first_grads is None:
            first_grads = {name: p.grad.detach().clone() for name, p in params.items()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_grads


def assert_within(name: str, actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    """``max|actual - expected| <= bound``, with a message saying where and how much otherwise."""
    from lora_engine.testing import describe_mismatch

    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= bound, describe_mismatch(name, actual, expected, bound)


def assert_same_logits(patched: torch.nn.Module, stock: torch.nn.Module, ids: torch.Tensor, tol: float) -> None:
    """Eval-mode logits of ``patched`` (the kernels) and ``stock`` (PEFT's forward, e.g. the saved adapter reloaded)
    for ``ids``: within ``tol`` times the largest |logit|."""
    import lora_engine

    with torch.no_grad(), lora_engine.use_backend("triton"):
        logits = patched.eval()(input_ids=ids).logits
    with torch.no_grad():
        stock_logits = stock.eval()(input_ids=ids).logits
    assert_within("logits", logits, stock_logits, tol * stock_logits.abs().max().item())

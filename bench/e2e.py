"""``python -m bench.e2e``: one QLoRA training step of a whole model, stock against patched.

A Llama-3-8B-shaped model (random weights, no download) with every decoder linear in bitsandbytes NF4
(double quant, bf16 compute), PEFT LoRA r=16 on q,k,v,o,gate,up,down, gradient checkpointing, AdamW, SDPA
attention, batch 4 x 2048. The same model is timed with stock PEFT layers and after
``lora_engine.patch_peft_model``; tokens/s and peak memory are printed side by side and written to
``bench/results/<gpu>/e2e.json``. ``--layers`` shrinks the depth (the per-layer work is unchanged).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .shapes import MODELS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(model_name: str, layers: int, vocab: int):
    """A random-weight causal LM whose decoder linears are bitsandbytes NF4 layers, wrapped by PEFT LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_engine.format import quantize_weight

    shape = MODELS[model_name]
    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, num_hidden_layers=layers,
        vocab_size=vocab, max_position_embeddings=8192, attn_implementation="sdpa", torch_dtype=torch.bfloat16,
    )  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")  # fmt: skip
                q.weight = quantize_weight(linear.weight.data, "nf4", blocksize=64, compress_statistics=True)
                setattr(parent, name, q)
    torch.cuda.empty_cache()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT picks its bnb layers on it
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model


def time_steps(model, batch: int, seq: int, vocab: int, steps: int) -> dict:
    """Median seconds per optimizer step after one warm-up step, and the peak memory of the steps."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)

    def step() -> float:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return dict(step_s=median, tokens_per_s=batch * seq / median, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                losses=losses)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import lora_engine

    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    p.add_argument("--model", default="llama3-8b", choices=list(MODELS))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.e2e needs a CUDA GPU.")
        return 0
    model = build_model(args.model, args.layers, args.vocab)
    stock = time_steps(model, args.batch, args.seq, args.vocab, args.steps)
    report = lora_engine.patch_peft_model(model)
    print(report)
    patched = time_steps(model, args.batch, args.seq, args.vocab, args.steps)
    print(f"{args.model} ({args.layers} layers), batch {args.batch} x {args.seq}, r=16 on {', '.join(TARGETS)}")
    for name, r in (("stock PEFT", stock), ("lora_engine", patched)):
        print(f"  {name:12s} step {r['step_s']:.3f} s  {r['tokens_per_s']:9.0f} tokens/s  peak {r['peak_gib']:.2f} GiB")
    print(f"  speedup {patched['tokens_per_s'] / stock['tokens_per_s']:.2f}x, "
          f"peak memory {patched['peak_gib'] / stock['peak_gib']:.2f}x")  # fmt: skip
    from .measure import results_dir

    out = results_dir(torch.cuda.get_device_name())
    out.mkdir(parents=True, exist_ok=True)
    record = dict(gpu=torch.cuda.get_device_name(), **vars(args), stock=stock, lora_engine=patched)
    (out / f"e2e-{args.model}-{args.layers}l.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""QLoRA on several GPUs (or CPU processes): a 4-bit Llama with PEFT LoRA (or DoRA, IA3: ``--dora``, ``--ia3``),
patched by lora_engine, trained with DDP or FSDP2 (``fully_shard``), and its adapter saved in PEFT's format from
rank 0.

    torchrun --standalone --nproc_per_node 2 examples/distributed_qlora.py --strategy fsdp --out adapter/
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_qlora.py --strategy fsdp --out adapter/

Without a model path it builds a small random Llama (``--tiny``), so it runs anywhere; on machines without a GPU
the ranks talk over gloo and the kernels run in Triton's interpreter. The recipe, in order:
  1. load the model in 4 bits (``BitsAndBytesConfig``), add LoRA with ``get_peft_model``;
  2. ``lora_engine.patch_peft_model(model)``: PEFT's LoRA layers run the fused kernels;
  3. shard (``fully_shard`` on each decoder layer, then the model) or wrap in DDP;
  4. train; gather the full state dict for saving (``get_model_state_dict(..., full_state_dict=True)``), and
     ``model.save_pretrained(out, state_dict=...)`` on rank 0 writes a stock PEFT adapter.
Under FSDP2 the fused layers read the gathered packed bytes with the quant state bitsandbytes keeps on the module.
A ``MixedPrecisionPolicy(param_dtype=...)`` casts every parameter, the packed 4-bit bytes included: store them in
that dtype (``--quant-storage`` = ``--param-dtype``), or the first forward says which combination cannot work.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch

TINY_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=("fsdp", "ddp", "none"), default="fsdp", help="none: one process, no wrapper")
    p.add_argument("--model", default=None, help="a Llama-family model directory (default: a tiny random Llama)")
    p.add_argument("--tiny-dir", default=None, help="where the tiny random Llama is written (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="save the trained adapter here (PEFT's format)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="global batch, split evenly over the ranks")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--quant-storage", choices=list(DTYPES), default="float32",
                   help="dtype holding the packed 4-bit codes (bnb_4bit_quant_storage)")  # fmt: skip
    p.add_argument("--compute-dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default: bfloat16 on a GPU, float32 on CPU")  # fmt: skip
    p.add_argument("--param-dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="FSDP2 MixedPrecisionPolicy param_dtype (default: none)")  # fmt: skip
    p.add_argument("--shard-lora-modules", action="store_true",
                   help="with --strategy fsdp, also shard each LoRA module (IA3: each layer's vectors) on its "
                        "own, as HF Trainer does with PEFT's fsdp_auto_wrap_policy (the fused forward reads them "
                        "whole inside FSDP's gather)")  # fmt: skip
    method = p.add_mutually_exclusive_group()
    method.add_argument("--dora", action="store_true", help="DoRA (PEFT's use_dora=True) instead of plain LoRA")
    method.add_argument("--ia3", action="store_true",
                        help="IA3 (PEFT's IA3Config: down_proj's input scaled, the others' output)")  # fmt: skip
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="lora_engine backend")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: one GPU per rank (NCCL) where there are GPUs, else CPU processes (gloo)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _setup_distributed(strategy: str, device: str) -> tuple[int, int, torch.device]:
    import torch.distributed as dist

    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if strategy == "none":
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if "RANK" not in os.environ:
        raise SystemExit(
            f"--strategy {strategy} needs a distributed launcher: torchrun --standalone --nproc_per_node N ..., or "
            "accelerate launch --multi_gpu --num_processes N ... (--strategy none runs one plain process)"
        )
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def _model_dir(args: argparse.Namespace, rank: int) -> str:
    """The model to load: ``--model``, or the tiny random Llama written once by rank 0."""
    if args.model:
        return args.model
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(args.tiny_dir or os.path.join(tempfile.gettempdir(), "lora_engine_tiny_llama"))
    if rank == 0 and not (path / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return str(path)


def build_model(args: argparse.Namespace, path: str, device: torch.device, compute: torch.dtype):
    """The 4-bit model with PEFT LoRA (or IA3) on every linear layer, lora_B randomized (as after some training)."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute,
                                      bnb_4bit_quant_storage=DTYPES[args.quant_storage])  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=compute,
                                                 device_map={"": device})  # fmt: skip
    torch.manual_seed(args.seed + 1)
    if args.ia3:
        projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = IA3Config(target_modules=projections, feedforward_modules=["down_proj"])
    else:
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", use_dora=args.dora)
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # PEFT starts lora_B at zero, which would make every lora_A gradient zero
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def shard(
    model: torch.nn.Module, strategy: str, param_dtype: Optional[torch.dtype], lora_modules: bool = False
) -> torch.nn.Module:
    """FSDP2 on each decoder layer and the root, or DDP, or nothing. ``lora_modules``: FSDP2 also on each LoRA
    module first, the wrapping HF Trainer applies to a PEFT model (PEFT's ``fsdp_auto_wrap_policy``)."""
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype) if param_dtype else MixedPrecisionPolicy()
        for layer in model.get_base_model().model.layers:
            if lora_modules:  # PEFT's rule: every leaf module with a trainable parameter
                for module in list(layer.modules()):
                    if not any(module.children()) and any(p.requires_grad for p in module.parameters()):
                        fully_shard(module, mp_policy=policy)
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def full_state_dict(model: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """Every parameter, whole, on the CPU (gathered from the shards under FSDP2; a collective: every rank calls)."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = model.module if strategy == "ddp" else model
    return {name: tensor.detach().cpu() for name, tensor in inner.state_dict().items()}


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton: the kernels on CPU
    import lora_engine

    rank, world, device = _setup_distributed(args.strategy, args.device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must split evenly over {world} ranks")
    lora_engine.set_backend(args.backend)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    peft_model = build_model(args, _model_dir(args, rank), device, compute)
    report = lora_engine.patch_peft_model(peft_model)  # before sharding: one line
    if args.shard_lora_modules and args.strategy != "fsdp":
        raise SystemExit("--shard-lora-modules goes with --strategy fsdp")
    param_dtype = getattr(torch, args.param_dtype) if args.param_dtype else None
    model = shard(peft_model, args.strategy, param_dtype, lora_modules=args.shard_lora_modules)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 2)
    losses = []
    for step in range(args.steps):
        ids = torch.randint(0, peft_model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        mine = ids.chunk(world)[rank].to(device)  # equal shares: the mean of the ranks' losses is the global one
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        if world > 1:  # the loss over the whole batch: the mean of the ranks' equal shares
            torch.distributed.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(mean_loss.item())
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.6f}", flush=True)
    state = full_state_dict(model, args.strategy)
    result = {
        "rank": rank,
        "world": world,
        "strategy": args.strategy,
        "losses": losses,
        "fused": report.num_fused,
        "layers": report.num_patched,
        "fallbacks": {name: reasons for name, reasons in report.fallbacks.items()},
    }
    if device.type == "cuda":  # the training's peak on this rank's GPU (the model, its shards, activations)
        result["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        print(f"peak GPU memory on rank {rank}: {result['peak_mib']} MiB")
    if rank == 0:
        print(report.summary())
        if args.out is not None:
            peft_model.save_pretrained(args.out, state_dict=state)
            (args.out / "run.json").write_text(json.dumps(result, indent=1) + "\n")
            print(f"adapter saved to {args.out}")
    if torch.distributed.is_initialized():
        # every rank waits for rank 0's save: a gloo rank tearing its group down while a peer still works aborts
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()

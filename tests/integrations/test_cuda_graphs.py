"""Inference of a patched model as fast generation runs it: a static KV cache with the forward compiled in
``mode="reduce-overhead"`` (CUDA graphs on a GPU), and a manual ``torch.cuda.CUDAGraph`` capture of the patched
projections. A graph keeps the addresses it captured, so both need calls without host synchronisation and without
any buffer that another call may move or free.

On a CPU, ``reduce-overhead`` compiles without CUDA graphs (the kernels run in the interpreter): the test then
checks what does not need a GPU, that the patched layers trace and serve a static-cache generation as eager does.
"""

from __future__ import annotations

import pytest
import torch

import lora_engine

from .conftest import randomize_lora_B

pytestmark = pytest.mark.interpreter

NEW_TOKENS = 5


def _patched_llama(load_4bit, device: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = load_4bit(torch.float32, device)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora_B(model, std=0.2)
    report = lora_engine.patch_peft_model(model)
    assert report.num_fused == report.num_patched == 14 and not report.fallbacks, str(report)
    return model.eval()


def _generate(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # disable_compile: transformers would compile a static-cache forward itself on a GPU; the test decides
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0,
                         disable_compile=True)  # fmt: skip
    return out.sequences, torch.stack(out.logits)


@pytest.mark.slow
def test_static_cache_generation_compiled_for_cuda_graphs_matches_eager(load_4bit, tokens, kernel_device):
    """The README's recipe: a static cache and ``torch.compile(mode="reduce-overhead")`` on the model's forward."""
    torch._dynamo.reset()
    model = _patched_llama(load_4bit, kernel_device)
    base = model.get_base_model()
    base.generation_config.cache_implementation = "static"
    prompt = tokens(7, batch=2, seq=6, device=kernel_device)
    with lora_engine.use_backend("triton"), torch.no_grad():
        eager_tokens, eager_logits = _generate(model, prompt)
        base.forward = torch.compile(base.forward, mode="reduce-overhead", fullgraph=True)
        try:
            for _ in range(2):  # the second run replays what the first recorded
                compiled_tokens, compiled_logits = _generate(model, prompt)
                assert torch.equal(compiled_tokens, eager_tokens)
                # fp32; the compiled graph fuses the torch ops around the kernels differently from eager
                tol = 1e-4 * eager_logits.abs().max().item()
                torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=tol)
        finally:
            del base.forward
            torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["dequant", "dequant_cublas", "gemv"])
def test_patched_projections_replay_from_a_cuda_graph(load_4bit, path):
    """Every 4-bit projection of a decoder layer, captured once: replays follow new inputs written into the static
    input, and stay right after other layers ran and the allocator released its cache."""
    model = _patched_llama(load_4bit, "cuda")
    layer = model.get_base_model().model.layers[0]
    projections = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.up_proj]

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [p(x) for p in projections] + [layer.mlp.down_proj(layer.mlp.up_proj(x))]

    static_x = torch.randn(4, 64, device="cuda")
    with lora_engine.force_path(path), torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # validation, operand caches and autotuning happen before the capture
                run(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(static_x)
        for seed in range(3):
            x = torch.randn(4, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            expected = run(x)
            model.get_base_model().model.layers[1].mlp(torch.randn(9, 64, device="cuda"))  # other layers' calls
            torch.cuda.empty_cache()
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            for got, want in zip(captured, expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # a stale buffer is off by O(1)


@pytest.mark.gpu
def test_mixed_batch_replays_from_a_cuda_graph():
    """A mixed batch of adapters captured once with its adapter indices on the GPU: replays follow new indices and
    inputs written in place; indices on the CPU cannot be captured and say so."""
    import bitsandbytes.functional as bnbF

    gen = torch.Generator("cuda").manual_seed(0)
    k, n, ranks = 128, 96, (4, 8, 16)
    dense = torch.randn(n, k, device="cuda", generator=gen) * 0.5
    weight, state = bnbF.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
    As = [torch.randn(r, k, device="cuda", generator=gen) * 0.3 for r in ranks]
    Bs = [torch.randn(n, r, device="cuda", generator=gen) * 0.3 for r in ranks]
    scalings = [2.0, 0.5, 1.25]

    def run(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return lora_engine.multi_lora_linear_4bit(x, weight, state, As, Bs, scalings, indices)

    static_x = torch.randn(16, k, device="cuda", generator=gen)
    static_indices = torch.arange(16, device="cuda") % 4 - 1  # -1: the base alone
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                run(static_x, static_indices)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(static_x, static_indices)
        for seed in range(3):
            x = torch.randn(16, k, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            indices = torch.randint(-1, 3, (16,), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            expected = run(x, indices.cpu())  # eager, host indices: copied without a sync
            static_x.copy_(x)
            static_indices.copy_(indices)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="adapter_indices is on the CPU during CUDA graph capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                run(static_x, static_indices.cpu())

"""No scratch state shared between calls: layers called from several threads, or replayed from CUDA graphs, give
each call its own decoded weight.

The thread test makes every kernel launch atomic and lets the other thread launch next, as two threads feeding
one GPU stream would interleave whole kernels. A decode buffer shared between layers then hands one layer the
other's weight between its decode and its GEMM.
"""

from __future__ import annotations

import threading
import time

import lora_engine.kernels.dequantize
import pytest
import torch

import lora_engine

pytestmark = pytest.mark.interpreter

CALLS_PER_THREAD = 6


def _layer(n: int, k: int, seed: int, device: str) -> lora_engine.LoRALinear4bit:
    torch.manual_seed(seed)
    layer = lora_engine.LoRALinear4bit.from_linear(torch.nn.Linear(k, n, bias=False), r=4, compute_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    return layer.to(device).eval()


@pytest.fixture
def atomic_launches(monkeypatch):
    """Each kernel launch runs whole, under one lock, then yields so that the other thread launches next."""
    lock = threading.Lock()
    kernel_type = type(lora_engine.kernels.dequantize._dequantize_4bit_kernel)
    original = kernel_type.__getitem__

    def atomic_getitem(self, grid):
        launch = original(self, grid)

        def run(*args, **kwargs):
            with lock:
                result = launch(*args, **kwargs)
            time.sleep(0.005)
            return result

        return run

    monkeypatch.setattr(kernel_type, "__getitem__", atomic_getitem)


@pytest.mark.parametrize("path", ["dequant", "dequant_cublas"])
def test_two_threads_two_layers_get_their_own_weights(atomic_launches, path, kernel_device):
    layers = [_layer(24, 64, 0, kernel_device), _layer(40, 64, 1, kernel_device)]
    x = torch.randn(3, 64, device=kernel_device)
    with lora_engine.force_path(path):
        expected = [layer(x) for layer in layers]
    wrong: list[str] = []

    def serve(index: int) -> None:
        with lora_engine.force_path(path):
            for call in range(CALLS_PER_THREAD):
                y = layers[index](x)
                if not torch.equal(y, expected[index]):
                    wrong.append(f"layer {index}, call {call}: max diff {(y - expected[index]).abs().max():.3g}")

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of {2 * CALLS_PER_THREAD} outputs computed with another layer's weight: {wrong}"


@pytest.mark.gpu
def test_cuda_graph_replays_right_after_a_larger_layer_ran():
    """A graph keeps the addresses it captured: nothing another layer does may free or overwrite them."""
    small, large = _layer(64, 128, 0, "cuda"), _layer(512, 1024, 1, "cuda")
    x_small, x_large = torch.randn(4, 128, device="cuda"), torch.randn(4, 1024, device="cuda")
    for path in ("dequant", "dequant_cublas", "fused"):
        with lora_engine.force_path(path), torch.no_grad():
            expected = small(x_small).clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    small(x_small)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = small(x_small)
            large(x_large)  # grows and overwrites any buffer shared between layers
            torch.cuda.empty_cache()
            large(x_large)
            graph.replay()
            torch.cuda.synchronize()
        torch.testing.assert_close(captured, expected, rtol=0, atol=0, msg=f"path {path}")

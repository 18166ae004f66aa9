"""Registry of real model configurations and the linear projections (N = out, K = in) a LoRA layer sees."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The sizes of one decoder layer that decide its linear projections."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    def projections(self) -> dict[str, tuple[int, int]]:
        """``{projection: (N, K)}`` for q, k, v, o, gate, up, down."""
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        return {
            "q_proj": (q_out, self.hidden),
            "k_proj": (kv_out, self.hidden),
            "v_proj": (kv_out, self.hidden),
            "o_proj": (self.hidden, q_out),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }


MODELS = {
    m.name: m
    for m in (
        ModelShape("llama3-8b", hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128),
        ModelShape("llama3-70b", hidden=8192, intermediate=28672, heads=64, kv_heads=8, head_dim=128),
        ModelShape("qwen2.5-7b", hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128),
        ModelShape("mistral-7b", hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128),
    )
}

# The three Llama-3-8B shapes ANCHORS.md measures: q/o (square), gate/up (wide out), down (wide in).
ANCHOR_PROJECTIONS = ("q_proj", "gate_proj", "down_proj")

M_TRAIN = (2048, 4096, 8192, 16384)
M_MIDDLE = (32, 64, 128, 256, 512, 1024)
M_DECODE = (1, 2, 4, 8, 16)


def layer_shapes(models: list[str], projections: tuple[str, ...] | None = None) -> list[tuple[str, str, int, int]]:
    """Distinct ``(model, projection, N, K)`` to measure, in registry order (repeated (N, K) pairs measured once)."""
    seen: set[tuple[int, int]] = set()
    shapes = []
    for model in models:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
        for proj, (n, k) in MODELS[model].projections().items():
            if projections is not None and proj not in projections:
                continue
            if (n, k) not in seen:
                seen.add((n, k))
                shapes.append((model, proj, n, k))
    return shapes

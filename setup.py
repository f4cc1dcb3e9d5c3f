"""Every repository folder installs under the one package `hippocrates` (hippocrates/__init__.py says how)."""
from pathlib import Path

from setuptools import setup

FOLDERS = ["engine", "kernels", "models", "train", "eval"]


def subpackages(folder: str) -> list[str]:
    """`folder` and every sub-folder holding Python files, as hippocrates.* names."""
    dirs = [Path(folder)] + [p for p in Path(folder).rglob("*") if p.is_dir() and "__pycache__" not in p.parts]
    return [".".join(("hippocrates", *d.parts)) for d in dirs if any(d.glob("*.py"))]


setup(
    name="hippocrates",
    version="0.2.0",
    description="Open training engine for medical language models: CPT, SFT and DPO on LLaMA-2 / Mistral.",
    python_requires=">=3.10",
    packages=["hippocrates", *(name for folder in FOLDERS for name in subpackages(folder))],
    package_dir={"hippocrates": "hippocrates", **{f"hippocrates.{folder}": folder for folder in FOLDERS}},
    package_data={"hippocrates.train": ["configs/*.yaml"], "hippocrates.eval": ["specs/*.yaml", "README.md"],
                  "hippocrates.kernels": ["cpu_fused.c"]},  # built on first use (kernels/native.py)
    entry_points={"console_scripts": ["hippo = hippocrates.cli:main"]},
    install_requires=[
        "torch>=2.6",  # FSDP2's public fully_shard and DCP; a GPU user keeps their own CUDA build
        "triton>=3.6; platform_system == 'Linux'",  # the kernels are compile-checked with 3.6 and the newest
        "safetensors>=0.4.3",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "datasets>=2.20",
        "tqdm>=4.66",
        "gguf>=0.10",
        "jinja2>=3.1",
        "pyyaml>=6.0",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "transformers>=5.0", "peft>=0.15", "kernels>=0.10", "lm-eval>=0.4.5,<0.5"],
        "lmeval": ["lm-eval>=0.4.5,<0.5"],
    },
)

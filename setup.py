from setuptools import setup

setup(
    name="hippocrates",
    version="0.1.0",
    description="Open training engine for medical language models: CPT, SFT and DPO on LLaMA-2 / Mistral.",
    python_requires=">=3.10",
    packages=["engine", "kernels", "models", "train", "eval"],
    package_data={"train": ["configs/*.yaml"]},
    install_requires=[
        "torch==2.13.0",
        "triton",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "numpy",
        "datasets",
        "einops",
        "tqdm",
        "gguf",
        "jinja2",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "transformers", "peft"]},
)

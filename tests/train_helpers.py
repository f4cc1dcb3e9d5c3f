"""Helpers shared by tests/test_train.py and tests/test_faults.py: a tiny random model with a real tokenizer, and
training runs as subprocesses (one process with python, two with torchrun and Gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def make_tiny_model(out_dir: Path, data_dir: Path, seed: int = 0) -> Path:
    """A 2-layer LLaMA-shaped model (GQA, tied embeddings) with random weights + the real LLaMA-2 tokenizer."""
    from hippocrates.models import ModelConfig, Transformer, load_tokenizer, save_pretrained
    tokenizer = load_tokenizer(data_dir / "tokenizers" / "llama2_tokenizer.model")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model = Transformer(config).init_weights(std=0.05, seed=seed)
    return save_pretrained(model, out_dir, tokenizer=tokenizer)


def cpt_args(model_dir: Path, out_dir: Path, **overrides) -> list[str]:
    """A small CPT run on real MedQuAD answers: 16-token rows, global batch 4."""
    keys = {"model": model_dir, "out_dir": out_dir, "seq_len": 16, "batch_size": 2, "grad_accum": 2,
            "max_steps": 6, "lr": 3e-3, "optim.warmup_steps": 1, "lora.rank": 4, "lora.alpha": 8,
            "data.limit": 40, "checkpoint.save_every": 2, "checkpoint.keep_last": 10}
    keys.update(overrides)
    return [f"{k}={v}" for k, v in keys.items()]


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HIPPO_KERNELS": "torch", **extra})
    return env


def launch(stage: str, args: list[str], nproc: int = 1, env: dict | None = None, **popen) -> subprocess.Popen:
    if nproc == 1:
        command = [sys.executable, str(REPO / "train" / f"{stage}.py"), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                   "--monitor_interval=0.2", str(REPO / "train" / f"{stage}.py"), *args]
    return subprocess.Popen(command, cwd=REPO, env=env or run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def run(stage: str, args: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = launch(stage, args, nproc, env)
    out, _ = proc.communicate(timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train/{stage}.py exited with {proc.returncode}:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in records}


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


def checkpoint_steps(out_dir: Path) -> list[int]:
    root = Path(out_dir) / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "meta.json").exists()) if root.exists() else []


def relative_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def tensors_close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()

"""What a run leaves in out_dir for people to read: metrics.jsonl, run.json (config, seed, versions), loss.png."""
from __future__ import annotations

import json
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

import torch
import yaml

from hippocrates.engine.data import IGNORE_INDEX

PACKAGES = ("torch", "triton", "safetensors", "tokenizers", "datasets", "numpy", "sentencepiece", "gguf",
            "transformers", "peft")


class MetricsLog:
    """One JSON object per optimizer step, appended and flushed as it happens (rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_records_after(resume_step)

    def _drop_records_after(self, step: int):
        """A resumed run repeats the steps after its checkpoint: forget what a killed run logged for them."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def real_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """The input tokens of a batch that are not padding (DPO: of its chosen and its rejected rows).

    Rows are right-padded. A row's real length is the larger of (its last labeled position + 2: that label is the
    next token, a real one) and (its last position whose id is not pad_id + 1), so the count is right whether or not
    pad_id equals eos_id, and for prompt or template tokens that carry no loss. One case reads as padding: a CPT row
    holding only the stream's final eos when eos_id == pad_id (it has no target either).
    """
    sides = ("chosen_", "rejected_") if "chosen_input_ids" in batch else ("",)
    total = 0
    for side in sides:
        ids, labels = batch[f"{side}input_ids"], batch[f"{side}labels"]  # [B, T] each
        positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)  # [T]: 1-based
        last_labeled = ((labels != IGNORE_INDEX) * positions).amax(dim=1)  # [B], 0 when none
        last_not_pad = ((ids != pad_id) * positions).amax(dim=1)  # [B]
        lengths = torch.maximum(torch.where(last_labeled > 0, last_labeled + 1, 0), last_not_pad)
        total += int(lengths.clamp(max=ids.shape[1]).sum())
    return total


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_run_info(out_dir: Path, config: dict, world_size: int, device: torch.device, model_path: str):
    """config.yaml (the resolved config, reusable with --config) and run.json (seed, versions, launch)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    info = {"seed": config["seed"], "model_path": model_path, "world_size": world_size, "device": str(device),
            "argv": sys.argv, "versions": package_versions()}
    (out_dir / "run.json").write_text(json.dumps(info, indent=2))


def plot_loss_curve(metrics_path: Path, png_path: Path):
    """loss (and held-out metrics if any) against the optimizer step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, marker=".", label="training loss")
    held_out = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    if held_out:
        ax.plot(*zip(*held_out), marker="o", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(str(metrics_path.parent))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)

"""The learning-rate schedule: linear warmup to lr, then cosine decay from lr to lr * min_lr_ratio at step
`total_steps` (max_steps unless optim.decay_steps says otherwise), flat after it.

The schedule is a pure function of the step and its settings, so a checkpoint's step is the whole scheduler state;
the checkpoint also records the settings (meta.json "schedule"), so a resume can say which cosine it follows."""
import math


def learning_rate(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (1-based)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    min_lr = lr * min_lr_ratio
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 1:
        return lr
    progress = min(1.0, (step - warmup_steps - 1) / (decay_steps - 1))  # 0 on the first step after warmup, 1 on the last
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))

"""The training loop for CPT, SFT and DPO: `train()` reads top to bottom as setup, resume, the steps, the end.

One optimizer step consumes a global batch of `batch_size x world_size x grad_accum` rows, drawn from a seeded
permutation of the dataset (a fresh one each epoch) as a function of the step alone. Every micro-batch loss is
divided by the number of targets in the whole global batch (tokens for CE, pairs for DPO), so summing over ranks
and accumulation steps gives the global mean, and a run's losses do not depend on how its batch is split.

Resuming with another max_steps (or optim.decay_steps) is allowed: the learning rate is a function of the step and
of the schedule's length (`decay_steps`, else `max_steps`), so from the first resumed step on the run follows the
cosine of its own length, not the checkpoint's; the checkpoint records its length and the resume logs both. Passing
optim.decay_steps=<the checkpoint's length> keeps the original cosine (flat at lr * min_lr_ratio past its end).

A run spread over several machines needs out_dir on a filesystem every rank sees (checkpoints and the export are
written by all ranks into one dir that rank 0 creates and commits): `check_shared_out_dir` stops at start otherwise.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from hippocrates.kernels import ops
from hippocrates.engine import checkpointing, distributed, faults
from hippocrates.engine.config import TrainConfig
from hippocrates.engine.data import IGNORE_INDEX, build_dataset
from hippocrates.engine.host_memory import keep_freed_memory, mmapped_forward
from hippocrates.engine.losses import dpo_logps, dpo_loss
from hippocrates.engine.losses import token_cross_entropy
from hippocrates.engine.metrics import MetricsLog, peak_memory_mb, plot_loss_curve, real_tokens, write_run_info
from hippocrates.engine.schedule import learning_rate

log = logging.getLogger("hippocrates")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
LOSS, STOP, REAL_TOKENS = 0, 1, 2  # the first entries of a step's all-reduced totals; the DPO metrics follow


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient; the message names the step."""


@dataclass
class Run:
    """Everything the steps share, built once by `setup` and `restore`."""
    cfg: TrainConfig
    env: distributed.DistEnv
    out_dir: Path
    model_path: str
    tokenizer: object
    train_set: object  # engine.data.RowDataset
    held_out: object | None
    eval_tasks: list
    model: torch.nn.Module
    reference: torch.nn.Module | None  # DPO with full fine-tuning: the frozen reference policy
    optimizer: torch.optim.Optimizer
    trainable: list
    fingerprint: dict
    io_group: object  # a Gloo group whose timeout covers checkpoint and export writes
    stop: "StopRequest"
    start_step: int = 0
    skipped_steps: int = 0  # non-finite steps skipped so far (skip_nonfinite), carried across resumes
    reference_logps: torch.Tensor | None = None  # [N, 2] precomputed DPO reference log-probs
    metrics_log: MetricsLog | None = None

    @property
    def lora(self):
        return self.cfg.lora if self.cfg.lora.rank > 0 else None

    @property
    def global_batch(self) -> int:
        return self.cfg.global_batch(self.env.world_size)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    totals: torch.Tensor  # the all-reduced sums: LOSS, STOP, REAL_TOKENS, then DPO_METRICS

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)

    @property
    def stop_requested(self) -> bool:
        return self.totals[STOP].item() > 0


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the configured training; return the last step's metrics."""
    run = setup(cfg)
    keep_freed_memory(run.env.device)
    restore(run)
    announce(run)
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, desc=cfg.stage, disable=not run.env.is_main,
               dynamic_ncols=True)
    run.model.train()
    record, last_saved = {}, run.start_step
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        result = optimizer_step(run, step)
        record = step_record(run, step, result) | evaluations(run, step)
        run.metrics_log.write(record)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if result.stop_requested or step == cfg.max_steps or (cfg.checkpoint.save_every and
                                                               step % cfg.checkpoint.save_every == 0):
            save(run, step)
            last_saved = step
        if result.stop_requested:
            bar.close()
            if run.env.is_main:
                print(f"{run.stop.name} received: saved checkpoint step_{step}; resume with resume=true",
                      file=sys.stderr, flush=True)
            distributed.teardown()
            return record
    bar.close()
    if last_saved < cfg.max_steps:  # resumed from the final checkpoint: nothing left to train
        log.info("checkpoint step_%d is the last step; exporting", last_saved)
    finish(run)
    return record


# ---------------------------------------------------------------------------------------------------------------
# setup and resume


def setup(cfg: TrainConfig) -> Run:
    """Process group, the shared-out_dir check, tokenizer, data, model(s) and optimizer; no checkpoint read yet."""
    env = distributed.setup(cfg.timeout_s)
    torch.manual_seed(cfg.seed + env.rank)  # only LoRA dropout draws from it; weights are seeded explicitly
    out_dir = Path(cfg.out_dir)
    checkpointing.check_shared_out_dir(out_dir, env)
    stop = StopRequest()

    model_path = distributed.broadcast_object(resolve_model_path(cfg.model) if env.is_main else None, env)
    from hippocrates.models import load_tokenizer
    tokenizer = load_tokenizer(model_path)
    train_set = build_dataset(cfg.stage, cfg.data, tokenizer, cfg.seq_len)  # every rank tokenizes a share
    held_out = None
    if cfg.data.held_out:
        held_out = build_dataset(cfg.stage, cfg.data, tokenizer, cfg.seq_len, "held_out")
    eval_tasks = load_eval_tasks(cfg) if cfg.eval.every and cfg.stage != "dpo" else []

    lora = cfg.lora if cfg.lora.rank > 0 else None
    model = distributed.load_sharded_model(model_path, env, lora, cfg.seed, cfg.mixed_precision,
                                           cfg.activation_checkpointing)
    if cfg.stage == "dpo" and not cfg.dpo.policy_dropout:  # TRL's default: the policy forward as deterministic
        disable_lora_dropout(model)                          # as the reference's
    reference = None
    if cfg.stage == "dpo" and lora is None:  # full fine-tuning: a frozen copy is the reference policy
        reference = distributed.load_sharded_model(model_path, env, None, cfg.seed, cfg.mixed_precision,
                                                   trainable=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                  fused=True)  # one kernel per tensor (CPU too): the per-op loop cost 0.7-1.9 s/step
    io_group = checkpointing.io_group(checkpointing.io_timeout_s(model, cfg.timeout_s))
    return Run(cfg, env, out_dir, model_path, tokenizer, train_set, held_out, eval_tasks, model, reference,
               optimizer, trainable, run_fingerprint(cfg, model.config, model_path, env.world_size), io_group, stop)


def restore(run: Run):
    """Resume from a checkpoint when asked (weights, AdamW, RNG, step, skipped steps), clean unfinished saves,
    open metrics.jsonl, write the run info, and precompute DPO reference log-probs when configured."""
    cfg, env = run.cfg, run.env
    resume_from = checkpointing.resolve_resume(cfg.checkpoint.resume, run.out_dir)
    if resume_from is None and checkpointing.finished_checkpoints(run.out_dir):
        raise checkpointing.CheckpointMismatchError(
            f"{run.out_dir} already holds checkpoints of an earlier run: pass resume=true to continue it, or choose "
            f"another out_dir")
    dist.barrier()  # every rank has looked at out_dir before rank 0 cleans it
    if env.is_main:
        checkpointing.remove_unfinished(run.out_dir)
    if resume_from is not None:
        checkpointing.check_fingerprint(resume_from, run.fingerprint)
        meta = checkpointing.load_checkpoint(resume_from, run.model, run.optimizer, env, run.io_group)
        run.start_step, run.skipped_steps = meta["step"], meta.get("skipped_steps", 0)
        log.info("resumed from %s at step %d (%d non-finite steps skipped before)", resume_from, run.start_step,
                 run.skipped_steps)
        log.info(describe_resumed_schedule(meta.get("schedule"), schedule(cfg), run.start_step + 1))
    run.metrics_log = MetricsLog(run.out_dir, env.is_main, resume_step=run.start_step)
    if env.is_main:
        write_run_info(run.out_dir, cfg.to_dict(), env.world_size, env.device, run.model_path)
    if cfg.stage == "dpo" and cfg.dpo.precompute_reference:
        run.reference_logps = precompute_reference_logps(run.model, run.reference, run.train_set, cfg.batch_size, env)


def schedule(cfg: TrainConfig) -> dict:
    """The learning-rate schedule's settings; `total_steps` is where the cosine reaches lr * min_lr_ratio."""
    if cfg.optim.decay_steps < 0:
        raise ValueError(f"optim.decay_steps={cfg.optim.decay_steps}: must be >= 0 (0 = max_steps)")
    return {"lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps, "min_lr_ratio": cfg.optim.min_lr_ratio,
            "total_steps": cfg.optim.decay_steps or cfg.max_steps}


def lr_at(step: int, sched: dict) -> float:
    return learning_rate(step, sched["lr"], sched["warmup_steps"], sched["total_steps"], sched["min_lr_ratio"])


def describe_resumed_schedule(saved: dict | None, current: dict, first_step: int) -> str:
    """One line: which cosine the resumed run follows, and the learning rate it jumps to if that changed."""
    ours = f"warmup {current['warmup_steps']}, cosine to step {current['total_steps']}"
    if saved is None:
        return f"learning-rate schedule: {ours} (the checkpoint does not record its own)"
    if saved["total_steps"] == current["total_steps"]:
        return f"learning-rate schedule: the checkpoint's ({ours})"
    return (f"learning-rate schedule: this run's ({ours}), not the checkpoint's (cosine to step "
            f"{saved['total_steps']}); step {first_step} runs at lr {lr_at(first_step, current):.3e} instead of "
            f"{lr_at(first_step, saved):.3e}; optim.decay_steps={saved['total_steps']} keeps the checkpoint's")


def announce(run: Run):
    if run.env.is_main:
        cfg = run.cfg
        print(f"{cfg.stage}: {len(run.train_set)} rows of {cfg.seq_len} tokens, global batch {run.global_batch} rows "
              f"({cfg.batch_size} x {run.env.world_size} ranks x {cfg.grad_accum} accumulation), "
              f"{sum(p.numel() for p in run.trainable):,} trainable parameters, steps {run.start_step + 1}.."
              f"{cfg.max_steps}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# one step


def optimizer_step(run: Run, step: int) -> StepResult:
    """Forward and backward of this rank's micro-batches of the global batch, the all-reduce of the loss and
    metrics, clipping, and AdamW (a non-finite step stops the run, or is skipped with skip_nonfinite)."""
    cfg, env = run.cfg, run.env
    started = time.perf_counter()
    lr = lr_at(step, schedule(cfg))
    for group in run.optimizer.param_groups:
        group["lr"] = lr

    rows = global_batch_rows(step, run.global_batch, len(run.train_set), cfg.seed)  # [global_batch], all ranks
    num_targets = count_targets(run.train_set, rows, cfg.stage)
    my_rows = rows.view(cfg.grad_accum, env.world_size, cfg.batch_size)[:, env.rank]  # [grad_accum, batch_size]
    totals = torch.zeros(3 + len(DPO_METRICS), dtype=torch.float64)
    for micro, micro_rows in enumerate(my_rows):
        batch = {k: v.to(env.device) for k, v in run.train_set[micro_rows].items()}
        totals[REAL_TOKENS] += real_tokens(batch, pad_id(run.tokenizer))
        distributed.set_gradient_sync(run.model, micro == cfg.grad_accum - 1)
        with mmapped_forward(env.device, cfg.mmap_activations):
            if cfg.stage == "dpo":
                if run.reference_logps is not None:
                    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = \
                        run.reference_logps[micro_rows].to(env.device).T
                loss, dpo_metrics = dpo_micro_loss(run.model, batch, num_targets, run.reference, cfg)
                totals[3:] += torch.stack([dpo_metrics[name] for name in DPO_METRICS]).double().cpu()
            else:
                loss = token_cross_entropy(run.model, batch, num_targets)
        loss = faults.poison_loss(step, loss)
        (loss * env.world_size).backward()  # FSDP averages gradients over ranks; the loss is already global
        totals[LOSS] += loss.detach().double().cpu()
    faults.maybe_raise(step, env.rank)
    totals[STOP] = float(run.stop.requested)
    distributed.all_reduce_sum(totals)
    grad_norm = clip_grad_norm(run.trainable, cfg.optim.grad_clip)
    result = StepResult(totals[LOSS].item(), grad_norm, lr, 0.0, totals)

    if result.finite:
        run.optimizer.step()
    else:
        skip_nonfinite_step(run, step, result)
    run.optimizer.zero_grad(set_to_none=True)
    faults.pause_step()
    result.seconds = time.perf_counter() - started
    return result


def skip_nonfinite_step(run: Run, step: int, result: StepResult):
    if not run.cfg.skip_nonfinite:
        last = checkpointing.finished_checkpoints(run.out_dir)
        raise NonFiniteError(
            f"step {step}: non-finite loss={result.loss} or grad_norm={result.grad_norm}; stopping "
            f"(last good checkpoint: {last[-1][1] if last else 'none'}; skip_nonfinite=true skips such steps)")
    run.skipped_steps += 1
    log.warning("step %d: non-finite loss=%s or grad_norm=%s, step skipped (%d so far)", step, result.loss,
                result.grad_norm, run.skipped_steps)


def step_record(run: Run, step: int, result: StepResult) -> dict:
    """The metrics.jsonl line of a step: tokens_per_s counts real (non-pad) input tokens, padded_tokens_per_s
    every position of the rows (DPO: chosen and rejected rows)."""
    padded_tokens = run.global_batch * run.cfg.seq_len * (2 if run.cfg.stage == "dpo" else 1)
    record = {"step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
              "tokens_per_s": result.totals[REAL_TOKENS].item() / result.seconds,
              "padded_tokens_per_s": padded_tokens / result.seconds, "step_time_s": result.seconds,
              "peak_memory_mb": peak_memory_mb(run.env.device), "skipped": not result.finite}
    if run.cfg.stage == "dpo":
        record.update({name: result.totals[3 + i].item() for i, name in enumerate(DPO_METRICS)})
    return record


def evaluations(run: Run, step: int) -> dict:
    """Held-out loss (every eval.every steps and at the end) and the eval tasks (every eval.every steps)."""
    cfg, every = run.cfg, run.cfg.eval.every
    scores = {}
    if run.held_out is not None and (step == cfg.max_steps or (every and step % every == 0)):
        scores.update(evaluate_held_out(run.model, run.reference, run.held_out, cfg, run.env))
    if run.eval_tasks and step % every == 0:
        scores.update(run_eval_tasks(run.model, run.tokenizer, run.eval_tasks))
    return scores


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and the end


def save(run: Run, step: int):
    extra = {"rows_consumed": step * run.global_batch, "skipped_steps": run.skipped_steps,
             "schedule": schedule(run.cfg)}
    checkpointing.save_checkpoint(run.out_dir, step, run.model, run.optimizer, extra, run.fingerprint, run.env,
                                  run.cfg.checkpoint.keep_last, run.io_group)


def finish(run: Run):
    """Export final/ (and adapter/), plot the loss curve, leave the process group."""
    checkpointing.export_final(run.model, run.out_dir, run.lora, run.tokenizer, run.model_path, run.env,
                               run.io_group)
    if run.env.is_main and run.metrics_log.path.exists():
        plot_loss_curve(run.metrics_log.path, run.out_dir / "loss.png")
        skipped = f" ({run.skipped_steps} non-finite steps skipped)" if run.skipped_steps else ""
        print(f"done: {run.out_dir}/final" + (f", {run.out_dir}/adapter" if run.lora else "") +
              f", {run.out_dir}/loss.png{skipped}", file=sys.stderr, flush=True)
    distributed.teardown()


# ---------------------------------------------------------------------------------------------------------------
# the pieces the steps call


class StopRequest:
    """SIGTERM / SIGINT set a flag the loop checks after each step (then saves and exits); a second one aborts."""

    def __init__(self):
        self.requested = False
        self.name = ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.requested = True
        self.name = signal.Signals(signum).name


def resolve_model_path(model: str) -> str:
    if model == "smollm2":
        from hippocrates.models.fetch import fetch_smollm2
        return str(fetch_smollm2())
    from hippocrates.models import PRESETS
    if model in PRESETS:
        raise checkpointing.CheckpointMismatchError(
            f"model={model!r} is an architecture preset without weights (for engine.dryrun); training needs a "
            f"checkpoint dir or .gguf file")
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model={model}: no such checkpoint dir or file")
    return str(path.resolve())


def global_batch_rows(step: int, global_batch: int, num_rows: int, seed: int) -> torch.Tensor:
    """Row indices of optimizer step `step` (1-based): positions [(step-1) B, step B) of an endless stream that
    visits every row once per epoch, in a seeded order that changes each epoch."""
    positions = torch.arange((step - 1) * global_batch, step * global_batch)
    epochs, offsets = positions // num_rows, positions % num_rows
    rows = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        in_epoch = epochs == epoch
        rows[in_epoch] = order[offsets[in_epoch]]
    return rows


def count_targets(dataset, rows: torch.Tensor, stage: str) -> int:
    """What the global batch's loss is averaged over: target tokens (CE), or pairs (DPO)."""
    if stage == "dpo":
        return len(rows)
    count = int((dataset[rows]["labels"] != IGNORE_INDEX).sum())
    return max(count, 1)


def pad_id(tokenizer) -> int:
    """The id the data pads rows with (engine.data's rule: the pad token, else eos)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def disable_lora_dropout(model):
    from hippocrates.models.lora import lora_layers
    for _, linear in lora_layers(model):
        linear.lora_dropout = 0.0


def dpo_micro_loss(model, batch, num_pairs: int, reference, cfg: TrainConfig):
    """Summed DPO loss of the micro-batch / global pairs, and its metrics weighted the same way."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = dpo_logps(model, batch, reference, cfg.dpo.loss_type)
    losses, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=cfg.dpo.beta,
                               loss_type=cfg.dpo.loss_type, label_smoothing=cfg.dpo.label_smoothing)
    weight = len(losses) / num_pairs
    return losses.sum() / num_pairs, {name: value.detach() * weight for name, value in metrics.items()}


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip to the global L2 norm (over all shards) and return that norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return norm.item()


@torch.no_grad()
def forward_every_row(dataset, per_row, batch_size: int, env, width: int) -> torch.Tensor:
    """`per_row(batch) -> [B, width]` over every row of `dataset`, rows split across ranks: -> [N, width].

    Every rank runs the same number of forwards (FSDP's collectives need it): the last chunk is padded with
    copies of row 0 whose results are dropped.
    """
    n = len(dataset)
    out = torch.zeros(n, width, dtype=torch.float64)
    chunk = batch_size * env.world_size
    for start in range(0, n, chunk):
        rows = torch.arange(start + env.rank * batch_size, start + (env.rank + 1) * batch_size)
        valid = rows < n
        batch = {k: v.to(env.device) for k, v in dataset[torch.where(valid, rows, 0)].items()}
        out[rows[valid]] = per_row(batch).double().cpu()[valid]
    return distributed.all_reduce_sum(out)


def precompute_reference_logps(model, reference, dataset, batch_size: int, env) -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) of every training pair, in one pass before training."""
    from hippocrates.engine.losses import reference_logps
    model.eval()
    logps = forward_every_row(dataset, lambda b: torch.stack(reference_logps(model, b, reference), dim=1),
                              batch_size, env, width=2)
    model.train()
    return logps.float()


def evaluate_held_out(model, reference, dataset, cfg: TrainConfig, env) -> dict:
    """eval/loss on the held-out rows (CE per token, or DPO loss and rewards/* per pair)."""
    model.eval()
    if cfg.stage == "dpo":
        def per_row(batch):
            return torch.stack(dpo_logps(model, batch, reference, cfg.dpo.loss_type), dim=1)  # [B, 4]
        logps = forward_every_row(dataset, per_row, cfg.batch_size, env, width=4).float()
        losses, metrics = dpo_loss(*logps.unbind(1), beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type,
                                   label_smoothing=cfg.dpo.label_smoothing)
        result = {"eval/loss": losses.mean().item(), **{f"eval/{k}": v.item() for k, v in metrics.items()}}
    else:
        def per_row(batch):
            hidden = model(batch["input_ids"], segment_ids=batch.get("segment_ids"), return_hidden=True)
            nll = ops.fused_linear_cross_entropy(hidden.flatten(0, 1), model.output_weight,
                                                     batch["labels"].flatten(), reduction="none")
            nll = nll.view(batch["labels"].shape).sum(dim=1)  # [B]
            return torch.stack([nll, (batch["labels"] != IGNORE_INDEX).sum(dim=1).to(nll.dtype)], dim=1)
        sums = forward_every_row(dataset, per_row, cfg.batch_size, env, width=2).sum(dim=0)
        result = {"eval/loss": (sums[0] / sums[1].clamp(min=1)).item()}
    model.train()
    return result


def load_eval_tasks(cfg: TrainConfig) -> list:
    """The multiple-choice tasks scored every `eval.every` steps, read and checked once before training."""
    from hippocrates.eval import load_task
    return [load_task(name, limit=cfg.eval.limit) for name in cfg.eval.tasks]


def run_eval_tasks(model, tokenizer, tasks: list) -> dict:
    """eval/{task}/acc, acc_norm and their standard errors (every rank runs it: FSDP forwards are collective)."""
    from hippocrates.eval import evaluate
    results = evaluate(model, tokenizer, tasks=tasks, progress=False)["results"]
    return {f"eval/{task}/{name}": scores[name] for task, scores in results.items()
            for name in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr") if name in scores}


def run_fingerprint(cfg: TrainConfig, model_config, model_path: str, world_size: int) -> dict:
    """What must match for a checkpoint to continue this run. The split of the global batch over ranks and
    accumulation steps may change; max_steps, optim.decay_steps (the schedule's length, logged on resume), out_dir
    and checkpoint settings may too."""
    fingerprint = {"stage": cfg.stage, "model": model_path, "seq_len": cfg.seq_len, "seed": cfg.seed,
                   "global_batch": cfg.global_batch(world_size), "lora.rank": cfg.lora.rank}
    fingerprint.update({f"model.config.{k}": v for k, v in model_config.to_hf().items()})
    if cfg.lora.rank:
        fingerprint.update({"lora.alpha": cfg.lora.alpha, "lora.dropout": cfg.lora.dropout,
                            "lora.target_modules": sorted(cfg.lora.target_modules)})
    fingerprint.update({f"data.{k}": v for k, v in vars(cfg.data).items() if k != "cache"})
    fingerprint.update({f"optim.{k}": v for k, v in vars(cfg.optim).items() if k != "decay_steps"})
    if cfg.stage == "dpo":
        fingerprint.update({f"dpo.{k}": v for k, v in vars(cfg.dpo).items()})
    return fingerprint

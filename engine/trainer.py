"""The training loop for CPT, SFT and DPO, read top to bottom in `train()`.

One optimizer step consumes a global batch of `batch_size x world_size x grad_accum` rows, drawn from a seeded
permutation of the dataset (a fresh one each epoch) as a function of the step alone. Every micro-batch loss is
divided by the number of targets in the whole global batch (tokens for CE, pairs for DPO), so summing over ranks
and accumulation steps gives the global mean, and a run's losses do not depend on how its batch is split.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from hippocrates.kernels import ops
from hippocrates.engine import checkpointing, distributed, faults
from hippocrates.engine.config import TrainConfig
from hippocrates.engine.data import IGNORE_INDEX, build_dataset
from hippocrates.engine.host_memory import mmapped_forward
from hippocrates.engine.losses import dpo_logps, dpo_loss
from hippocrates.engine.losses import token_cross_entropy
from hippocrates.engine.metrics import MetricsLog, peak_memory_mb, plot_loss_curve, write_run_info
from hippocrates.engine.schedule import learning_rate

log = logging.getLogger("hippocrates")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient; the message names the step."""


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the configured training; return the last step's metrics."""
    env = distributed.setup(cfg.timeout_s)
    torch.manual_seed(cfg.seed + env.rank)  # only LoRA dropout draws from it; weights are seeded explicitly
    out_dir = Path(cfg.out_dir)
    stop = StopRequest()

    # ---- model, tokenizer and data
    model_path = distributed.broadcast_object(resolve_model_path(cfg.model) if env.is_main else None, env)
    from hippocrates.models import load_tokenizer
    tokenizer = load_tokenizer(model_path)
    train_set = rank0_first(lambda: build_dataset(cfg.stage, cfg.data, tokenizer, cfg.seq_len), env)
    held_out = None
    if cfg.data.held_out:
        held_out = rank0_first(lambda: build_dataset(cfg.stage, cfg.data, tokenizer, cfg.seq_len, "held_out"), env)
    eval_tasks = load_eval_tasks(cfg) if cfg.eval.every and cfg.stage != "dpo" else []
    lora = cfg.lora if cfg.lora.rank > 0 else None
    model = distributed.load_sharded_model(model_path, env, lora, cfg.seed, cfg.mixed_precision,
                                           cfg.activation_checkpointing)
    reference = None
    if cfg.stage == "dpo" and lora is None:  # full fine-tuning: a frozen copy is the reference policy
        reference = distributed.load_sharded_model(model_path, env, None, cfg.seed, cfg.mixed_precision,
                                                   trainable=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)

    # ---- resume
    fingerprint = run_fingerprint(cfg, model.config, model_path, env.world_size)
    resume_from = checkpointing.resolve_resume(cfg.checkpoint.resume, out_dir)
    if resume_from is None and checkpointing.finished_checkpoints(out_dir):
        raise checkpointing.CheckpointMismatchError(
            f"{out_dir} already holds checkpoints of an earlier run: pass resume=true to continue it, or choose "
            f"another out_dir")
    dist.barrier()  # every rank has looked at out_dir before rank 0 cleans it
    if env.is_main:
        checkpointing.remove_unfinished(out_dir)
    start_step = 0
    if resume_from is not None:
        checkpointing.check_fingerprint(resume_from, fingerprint)
        start_step = checkpointing.load_checkpoint(resume_from, model, optimizer, env)["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    metrics_log = MetricsLog(out_dir, env.is_main, resume_step=start_step)
    if env.is_main:
        write_run_info(out_dir, cfg.to_dict(), env.world_size, env.device, model_path)

    reference_logps = None
    if cfg.stage == "dpo" and cfg.dpo.precompute_reference:
        reference_logps = precompute_reference_logps(model, reference, train_set, cfg.batch_size, env)

    # ---- the loop
    global_batch = cfg.global_batch(env.world_size)
    tokens_per_step = global_batch * cfg.seq_len * (2 if cfg.stage == "dpo" else 1)
    if env.is_main:
        print(f"{cfg.stage}: {len(train_set)} rows of {cfg.seq_len} tokens, global batch {global_batch} rows "
              f"({cfg.batch_size} x {env.world_size} ranks x {cfg.grad_accum} accumulation), "
              f"{sum(p.numel() for p in trainable):,} trainable parameters, steps {start_step + 1}..{cfg.max_steps}",
              file=sys.stderr, flush=True)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=cfg.stage, disable=not env.is_main, dynamic_ncols=True)
    record, skipped_steps, last_saved = {}, 0, start_step
    model.train()
    for step in range(start_step + 1, cfg.max_steps + 1):
        started = time.perf_counter()
        lr = learning_rate(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        rows = global_batch_rows(step, global_batch, len(train_set), cfg.seed)  # [global_batch], same on all ranks
        num_targets = count_targets(train_set, rows, cfg.stage)
        my_rows = rows.view(cfg.grad_accum, env.world_size, cfg.batch_size)[:, env.rank]  # [grad_accum, batch_size]
        totals = torch.zeros(2 + len(DPO_METRICS), dtype=torch.float64)  # loss, stop request, DPO metrics
        for micro, micro_rows in enumerate(my_rows):
            batch = {k: v.to(env.device) for k, v in train_set[micro_rows].items()}
            if reference_logps is not None:
                batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference_logps[micro_rows].to(env.device).T
            model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with mmapped_forward(env.device, cfg.mmap_activations):
                if cfg.stage == "dpo":
                    loss, dpo_metrics = dpo_micro_loss(model, batch, num_targets, reference, cfg)
                    totals[2:] += torch.stack([dpo_metrics[name] for name in DPO_METRICS]).double().cpu()
                else:
                    loss = token_cross_entropy(model, batch, num_targets)
            loss = faults.poison_loss(step, loss)
            (loss * env.world_size).backward()  # FSDP averages gradients over ranks; the loss is already global
            totals[0] += loss.detach().double().cpu()
        faults.maybe_raise(step, env.rank)
        totals[1] = float(stop.requested)
        distributed.all_reduce_sum(totals)
        grad_norm = clip_grad_norm(trainable, cfg.optim.grad_clip)
        loss_value = totals[0].item()

        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            if not cfg.skip_nonfinite:
                last = checkpointing.finished_checkpoints(out_dir)
                raise NonFiniteError(
                    f"step {step}: non-finite loss={loss_value} or grad_norm={grad_norm}; stopping "
                    f"(last good checkpoint: {last[-1][1] if last else 'none'}; skip_nonfinite=true skips such steps)")
            skipped_steps += 1
            log.warning("step %d: non-finite loss=%s or grad_norm=%s, step skipped (%d so far)", step, loss_value,
                        grad_norm, skipped_steps)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        faults.pause_step()

        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed,
                  "peak_memory_mb": peak_memory_mb(env.device), "skipped": not math.isfinite(loss_value + grad_norm)}
        if cfg.stage == "dpo":
            record.update({name: totals[2 + i].item() for i, name in enumerate(DPO_METRICS)})
        if held_out is not None and (step == cfg.max_steps or (cfg.eval.every and step % cfg.eval.every == 0)):
            record.update(evaluate_held_out(model, reference, held_out, cfg, env))
        if eval_tasks and step % cfg.eval.every == 0:
            record.update(run_eval_tasks(model, tokenizer, eval_tasks))
        metrics_log.write(record)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)

        stopping = totals[1].item() > 0
        if stopping or step == cfg.max_steps or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
            extra = {"rows_consumed": step * global_batch, "skipped_steps": skipped_steps}
            checkpointing.save_checkpoint(out_dir, step, model, optimizer, extra, fingerprint, env,
                                          cfg.checkpoint.keep_last)
            last_saved = step
        if stopping:
            bar.close()
            if env.is_main:
                print(f"{stop.name} received: saved checkpoint step_{step}; resume with resume=true",
                      file=sys.stderr, flush=True)
            distributed.teardown()
            return record
    bar.close()

    # ---- the end: export, plot
    if last_saved < cfg.max_steps:  # resumed from the final checkpoint: nothing left to train
        log.info("checkpoint step_%d is the last step; exporting", last_saved)
    checkpointing.export_final(model, out_dir, lora, tokenizer, model_path, env)
    if env.is_main and metrics_log.path.exists():
        plot_loss_curve(metrics_log.path, out_dir / "loss.png")
        print(f"done: {out_dir}/final" + (f", {out_dir}/adapter" if lora else "") + f", {out_dir}/loss.png",
              file=sys.stderr, flush=True)
    distributed.teardown()
    return record


# ---------------------------------------------------------------------------------------------------------------
# the pieces the loop calls


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


def rank0_first(build, env):
    """Rank 0 builds (and caches) first; the others then read its cache instead of tokenizing again."""
    result = build() if env.is_main else None
    dist.barrier()
    return result if env.is_main else build()


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
    count = int((dataset.tensors["labels"][rows] != IGNORE_INDEX).sum())
    return max(count, 1)


def dpo_micro_loss(model, batch, num_pairs: int, reference, cfg: TrainConfig):
    """Summed DPO loss of the micro-batch / global pairs, and its metrics weighted the same way."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = dpo_logps(model, batch, reference)
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
            return torch.stack(dpo_logps(model, batch, reference), dim=1)  # [B, 4]
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
    accumulation steps may change; max_steps, out_dir and checkpoint settings may too."""
    fingerprint = {"stage": cfg.stage, "model": model_path, "seq_len": cfg.seq_len, "seed": cfg.seed,
                   "global_batch": cfg.global_batch(world_size), "lora.rank": cfg.lora.rank}
    fingerprint.update({f"model.config.{k}": v for k, v in model_config.to_hf().items()})
    if cfg.lora.rank:
        fingerprint.update({"lora.alpha": cfg.lora.alpha, "lora.dropout": cfg.lora.dropout,
                            "lora.target_modules": sorted(cfg.lora.target_modules)})
    fingerprint.update({f"data.{k}": v for k, v in vars(cfg.data).items() if k != "cache"})
    fingerprint.update({f"optim.{k}": v for k, v in vars(cfg.optim).items()})
    if cfg.stage == "dpo":
        fingerprint.update({f"dpo.{k}": v for k, v in vars(cfg.dpo).items()})
    return fingerprint

"""CPT training throughput and peak memory: the trainer's own step vs transformers + peft on the same rows.

    python benchmarks/train_throughput.py [--rounds 3] [--steps 3] [--warmup 1] [--sides trainer,hf,engine,...]

Workload (issues 4 and 15): SmolLM2-135M-Instruct, fp32, 1 process, 2 threads, rows of 512 tokens of MedQuAD
answers packed by the CPT data pipeline (train/configs/cpt.yaml's data), 4 rows per step, LoRA rank 16 (alpha 32)
on every linear layer of every block, AdamW on the adapters, gradient clipping at 1.0. The sides:
  trainer: the default path, `python train/cpt.py` itself with the default keys and
           `seq_len=512 batch_size=4 lora.rank=16 max_steps=warmup+steps`; the step times are the `step_time_s`
           of its metrics.jsonl, its CPU seconds per step are read from /proc while it runs (the process CPU time
           between two metrics lines), its peak RSS is the last line's `peak_memory_mb` (ru_maxrss).
  hf:      transformers LlamaForCausalLM from the same HF dir + peft LoraConfig(r=16, all linear), the standard
           `model(input_ids, labels=input_ids).loss` on the rows the trainer draws for the same steps.
  engine, engine_mmap: an isolated loop of the engine's forward/backward (models.load_model + add_lora,
           engine.losses.token_cross_entropy inside engine.host_memory.mmapped_forward, as the trainer runs it) on
           the same rows, with mmap_activations off (the default) / on, under the trainer's OpenMP wait policy
           (engine/openmp.py); hf runs in the environment as given.
Each side runs in its own process (so ru_maxrss is that side's peak), the sides alternate for `--rounds` rounds in
one run (the CPU may be shared: compare the per-round ratios and the CPU seconds). The matmul-bound ceiling is
measured in the same run, right after each side's process ends: GFLOP/s of a 2048^3 fp32 matmul divided by the
FLOPs per token of LoRA training computed from the model's shape.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hippocrates.engine.openmp import WAIT_POLICY

ROOT = Path(__file__).resolve().parent.parent

THREADS = 2
LORA_RANK, LORA_ALPHA = 16, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------------------
# the workload


def train_overrides(model_dir: Path, seq_len: int, batch_size: int, max_steps: int) -> list[str]:
    """The key=value overrides of the benchmark run; every other key keeps its default."""
    return [f"model={model_dir}", f"seq_len={seq_len}", f"batch_size={batch_size}", f"lora.rank={LORA_RANK}",
            f"lora.alpha={LORA_ALPHA}", f"max_steps={max_steps}"]


def trainer_rows(overrides: list[str], steps: int) -> dict[str, torch.Tensor]:
    """The rows the trainer reads in steps 1..steps, in order: input_ids, labels, segment_ids [steps * B, T]."""
    from hippocrates.engine.config import load_config
    from hippocrates.engine.data import build_dataset
    from hippocrates.models import load_tokenizer

    cfg = load_config("cpt", None, overrides)
    dataset = build_dataset("cpt", cfg.data, load_tokenizer(cfg.model), cfg.seq_len)  # the trainer's cache
    # The trainer's order (engine/trainer.py, global_batch_rows): epoch e visits the rows in randperm(seed, e).
    positions = torch.arange(steps * cfg.batch_size)
    rows = torch.cat([torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + e))
                      [positions[positions // len(dataset) == e] % len(dataset)]
                      for e in (positions // len(dataset)).unique().tolist()])
    return dataset[rows]


def lora_training_flops_per_token(config, seq_len: int, rank: int) -> float:
    """Matmul FLOPs per token of one LoRA training step (forward + backward, frozen base).

    Frozen weights need the forward (2 P) and the input gradient (2 P) but no weight gradient; adapters need all
    three (6 r (in + out)); causal attention scores and values average T/2 keys per query, 2 matmuls forward and 4
    backward.
    """
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]  # (in, out) of each linear in a block
    frozen = config.num_layers * sum(a * b for a, b in shapes) + config.vocab_size * h  # + LM head
    adapters = config.num_layers * sum(rank * (a + b) for a, b in shapes)
    attention = config.num_layers * 2 * 2 * (seq_len / 2) * q  # QK^T and PV forward
    return 4 * frozen + 6 * adapters + 3 * attention


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# the trainer side: train/cpt.py in a subprocess


def process_cpu_s(pid: int) -> float:
    """utime + stime of a running process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_trainer(overrides: list[str], warmup: int, out_dir: Path) -> dict:
    """Run train/cpt.py; per step: step_time_s from metrics.jsonl and the process CPU time since the last line."""
    command = [sys.executable, str(ROOT / "train" / "cpt.py"), f"out_dir={out_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    metrics = out_dir / "metrics.jsonl"
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        cpu_at_line, lines = [], 0
        try:
            while process.poll() is None:
                now_lines = metrics.read_text().count("\n") if metrics.exists() else 0
                if now_lines > lines:
                    cpu = process_cpu_s(process.pid)
                    cpu_at_line += [cpu] * (now_lines - lines)  # lines within one poll: their split is unknown
                    lines = now_lines
                time.sleep(0.02)
        finally:
            if process.poll() is None:  # the benchmark was interrupted: do not leave the run behind
                process.kill()
                process.wait()
        wall = time.perf_counter() - started
        if process.returncode != 0:
            log.seek(0)
            raise SystemExit(f"train/cpt.py failed:\n{log.read().decode()[-4000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    cpu_s = [b - a for a, b in zip(cpu_at_line, cpu_at_line[1:])][warmup - 1:]  # step k: line k minus line k-1
    return {"step_s": [r["step_time_s"] for r in records[warmup:]], "cpu_s": cpu_s,
            "peak_rss_kb": records[-1]["peak_memory_mb"] * 1024, "losses": [r["loss"] for r in records],
            "process_wall_s": wall}


# ---------------------------------------------------------------------------------------------------------------
# the loop sides, each in its own process


def engine_side(model_dir: Path, mmap_activations: bool = False):
    from hippocrates.engine.host_memory import keep_freed_memory, mmapped_forward
    from hippocrates.engine.losses import count_target_tokens, token_cross_entropy
    from hippocrates.models import load_model
    from hippocrates.models.lora import LoraConfig, add_lora

    model = load_model(model_dir, dtype=torch.float32)
    add_lora(model, LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, target_modules=TARGETS), seed=0)
    model.train()
    keep_freed_memory("cpu")  # as engine/trainer.py does

    def loss_fn(batch):  # as engine/trainer.py runs the forward
        with mmapped_forward("cpu", mmap_activations):
            return token_cross_entropy(model, batch, count_target_tokens(batch["labels"]))

    return model, loss_fn


def hf_side(model_dir: Path):
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    model.train()

    def loss_fn(batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    return model, loss_fn


LOOP_SIDES = {"engine": engine_side, "engine_mmap": lambda model_dir: engine_side(model_dir, mmap_activations=True),
              "hf": hf_side}


def run_worker(side: str, model_dir: Path, data_file: Path, batch_size: int, warmup: int, steps: int,
               profile: bool, out_dir: Path | None) -> dict:
    """The loop: rows, forward, backward, clip at 1.0, fused AdamW (the trainer's lr and weight decay), zero_grad."""
    from hippocrates.engine.config import load_config

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    data = torch.load(data_file, weights_only=True)
    optim = load_config("cpt").optim
    model, loss_fn = LOOP_SIDES[side](model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: what engine/trainer.py builds, and Hugging Face Trainer's default optimizer (adamw_torch_fused)
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)

    def step(index):
        rows = slice(index * batch_size, (index + 1) * batch_size)
        batch = {k: v[rows] for k, v in data.items()}
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        if profile and i == warmup:
            losses.append(profile_step(step, i, side, out_dir))
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(i))
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {"step_s": times, "cpu_s": cpu_times, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "losses": losses}


def profile_step(step, index, side, out_dir):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = step(index)
    print(f"--- {side}: top ops by self CPU time ---", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out_dir / f"trace_{side}.json"))
    return loss


# ---------------------------------------------------------------------------------------------------------------
# the driver


def spawn_loop(side, args, data_file) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--model", str(args.model), "--data-file", str(data_file),
               "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.profile == side:
        command += ["--profile", side]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    if side.startswith("engine"):  # the trainer's OpenMP wait policy (train/cli.py, engine/openmp.py)
        env.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{done.stderr[-4000:]}")
    if args.profile == side:
        print(done.stderr, file=sys.stderr)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), process_wall_s=time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF dir (default: models.fetch.fetch_smollm2())")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the sides")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    parser.add_argument("--sides", default="trainer,hf",
                        help="trainer (train/cpt.py), hf, and the isolated loops engine, engine_mmap")
    parser.add_argument("--profile", choices=list(LOOP_SIDES), default=None,
                        help="profile the first timed step of that loop side (printed, not timed)")
    parser.add_argument("--worker", choices=list(LOOP_SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the trainer's first step's CPU time includes its start-up)")
    if args.profile and args.steps < 2:
        parser.error("--profile needs --steps >= 2 (the profiled step is not timed)")

    if args.worker:
        result = run_worker(args.worker, Path(args.model), Path(args.data_file), args.batch_size, args.warmup,
                            args.steps, args.profile == args.worker, ROOT / "benchmarks" / "out")
        print(json.dumps(result))
        return

    from hippocrates.models.config import ModelConfig

    torch.set_num_threads(THREADS)
    if args.model is None:
        from hippocrates.models.fetch import fetch_smollm2
        args.model = fetch_smollm2()
    model_dir = Path(args.model)
    config = ModelConfig.from_file(model_dir / "config.json")
    flops = lora_training_flops_per_token(config, args.seq_len, LORA_RANK)
    overrides = train_overrides(model_dir, args.seq_len, args.batch_size, args.warmup + args.steps)
    sides = args.sides.split(",")
    results = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "rows.pt"
        torch.save(trainer_rows(overrides, args.warmup + args.steps), data_file)
        for round_index in range(args.rounds):
            for side in sides:
                if side == "trainer":
                    result = run_trainer(overrides, args.warmup, Path(tmp) / f"run{round_index}")
                else:
                    result = spawn_loop(side, args, data_file)
                result["matmul_gflops"] = matmul_gflops()  # the CPU as this side saw it, measured right after
                result["tokens_per_s"] = args.batch_size * args.seq_len / statistics.median(result["step_s"])
                results[side].append(result)
                print(f"round {round_index + 1} {side}: {result['tokens_per_s']:.1f} tokens/s, CPU "
                      f"{statistics.median(result['cpu_s']):.2f} s/step, matmul {result['matmul_gflops']:.1f} GFLOP/s",
                      file=sys.stderr, flush=True)
    report(results, args, model_dir, flops)


def report(results: dict, args, model_dir: Path, flops: float):
    print(f"workload: {model_dir.name}, seq {args.seq_len} x batch {args.batch_size}, LoRA r={LORA_RANK} on "
          f"{len(TARGETS)} linears/block, fp32, 1 process, {THREADS} threads; {args.rounds} alternating rounds x "
          f"{args.steps} timed steps after {args.warmup} warmup; LoRA training {flops / 1e9:.3f} GFLOP/token")
    summary = {}
    for side, runs in results.items():
        summary[side] = {
            "tps": args.batch_size * args.seq_len / statistics.median(s for r in runs for s in r["step_s"]),
            "rounds": [r["tokens_per_s"] for r in runs],
            "cpu_s": statistics.median(s for r in runs for s in r["cpu_s"]),
            "ceiling": [r["tokens_per_s"] / (r["matmul_gflops"] * 1e9 / flops) for r in runs],
            "gflops": [r["matmul_gflops"] for r in runs],
            "rss": max(r["peak_rss_kb"] for r in runs) / 2 ** 20,
            "wall": statistics.median(r["process_wall_s"] for r in runs),
            "loss": runs[0]["losses"][0]}
    header = (f"{'side':11} {'tokens/s':>8} {'per round':>20} {'CPU s/step':>10} {'matmul GF/s':>17} "
              f"{'of ceiling':>16} {'peak RSS GB':>11} {'process s':>9} {'first loss':>10}")
    print(header)
    print("-" * len(header))
    for side, s in summary.items():
        per_round = "/".join(f"{x:.1f}" for x in s["rounds"])
        gflops = "/".join(f"{x:.0f}" for x in s["gflops"])
        ceiling = "/".join(f"{x:.2f}" for x in s["ceiling"])
        print(f"{side:11} {s['tps']:8.1f} {per_round:>20} {s['cpu_s']:10.2f} {gflops:>17} {ceiling:>16} "
              f"{s['rss']:11.2f} {s['wall']:9.1f} {s['loss']:10.4f}")
    for side in [s for s in summary if s != "hf"] if "hf" in summary else []:
        paired = [e["tokens_per_s"] / h["tokens_per_s"] for e, h in zip(results[side], results["hf"])]
        cpu = summary["hf"]["cpu_s"] / summary[side]["cpu_s"]
        memory = summary[side]["rss"] / summary["hf"]["rss"]
        print(f"{side} / hf: tokens/s median of rounds {statistics.median(paired):.2f}x (per round "
              f"{'/'.join(f'{x:.2f}' for x in paired)}; target >= 1.25, none below 1.10), by CPU s/step {cpu:.2f}x "
              f"(target >= 1.2), peak RSS {memory:.2f}x (target <= 0.50), of the matmul ceiling "
              f"{statistics.median(summary[side]['ceiling']):.2f} (target >= 0.75)")


if __name__ == "__main__":
    main()

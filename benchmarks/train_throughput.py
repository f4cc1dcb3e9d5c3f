"""CPT training throughput and peak memory: the engine vs transformers + peft on the same workload.

    python benchmarks/train_throughput.py [--rounds 2] [--steps 3] [--warmup 1] [--profile engine|engine_heap|hf]

Workload (issue 4): SmolLM2-135M-Instruct, fp32, 2 threads, LoRA rank 16 (alpha 32) on every linear layer of every
block, AdamW on the adapters, rows of 512 tokens from MedQuAD answers ([bos] answer [eos] packed), 4 rows per step.
  engine: models.load_model + models.lora.add_lora, engine.losses.token_cross_entropy (packed documents: segment ids,
          no loss across a document boundary) in engine.host_memory.mmapped_forward as engine/trainer.py runs
          it, loss.backward(), AdamW step.
  engine_heap: the same with mmap_activations=false (every allocation from glibc's heap, as the hf side).
  hf:     transformers LlamaForCausalLM from the same HF dir + peft LoraConfig(r=16, all linear), the standard
          `model(input_ids, labels=input_ids).loss`, loss.backward(), AdamW step.
Each side runs in its own subprocess (so ru_maxrss is that side's peak resident set), the sides alternate for
`--rounds` rounds (the CPU may be shared: compare the ratios), and each subprocess times `--steps` steps after
`--warmup` steps. The matmul-bound ceiling is measured in the same run: GFLOP/s of a 2048^3 fp32 matmul divided by
the FLOPs per token of LoRA training computed from the model's shape. Peak RSS is ru_maxrss after the warmup and
timed steps: it grows over the first steps as the heap fragments, so more steps can only raise it.
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

ROOT = Path(__file__).resolve().parent.parent

THREADS = 2
LORA_RANK, LORA_ALPHA = 16, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------------------
# the workload


def pack_medquad(model_dir: Path, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """MedQuAD answers as [bos] tokens [eos] documents, concatenated and cut into `rows` rows of `seq_len` tokens.

    input_ids [rows, T]; labels [rows, T] (next token, -100 where the next token is another document's or past the
    row); segment_ids [rows, T] (one id per document piece in a row).
    """
    from hippocrates.models import load_tokenizer
    from hippocrates.models.paths import data_dir

    tokenizer = load_tokenizer(model_dir)
    need = rows * seq_len
    stream, doc_of_token = [], []
    with open(data_dir() / "corpus" / "medquad_qa.jsonl") as f:
        for doc, line in enumerate(f):
            ids = tokenizer.encode(json.loads(line)["answer"], bos=True, eos=True)
            stream += ids
            doc_of_token += [doc] * len(ids)
            if len(stream) >= need:
                break
    input_ids = torch.tensor(stream[:need]).view(rows, seq_len)
    docs = torch.tensor(doc_of_token[:need]).view(rows, seq_len)
    labels = torch.full_like(input_ids, -100)
    same_doc = docs[:, 1:] == docs[:, :-1]
    labels[:, :-1] = torch.where(same_doc, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
    segment_ids = docs - docs[:, :1]
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}


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


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# one side, in its own process


def engine_side(model_dir: Path, mmap_activations: bool = True):
    from hippocrates.engine.host_memory import mmapped_forward
    from hippocrates.engine.losses import count_target_tokens, token_cross_entropy
    from hippocrates.models import load_model
    from hippocrates.models.lora import LoraConfig, add_lora

    model = load_model(model_dir, dtype=torch.float32)
    add_lora(model, LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, target_modules=TARGETS), seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(batch):  # as engine/trainer.py runs the forward
        with mmapped_forward("cpu", mmap_activations):
            return token_cross_entropy(model, batch, count_target_tokens(batch["labels"]))

    return model, params, loss_fn


def hf_side(model_dir: Path):
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    return model, params, loss_fn


SIDES = {"engine": engine_side, "engine_heap": lambda model_dir: engine_side(model_dir, mmap_activations=False),
         "hf": hf_side}


def run_worker(side: str, model_dir: Path, data_file: Path, batch_size: int, warmup: int, steps: int,
               profile: bool, out_dir: Path | None) -> dict:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    data = torch.load(data_file, weights_only=True)
    model, params, loss_fn = SIDES[side](model_dir)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step(index):
        rows = slice(index * batch_size, (index + 1) * batch_size)
        batch = {k: v[rows] for k, v in data.items()}
        loss = loss_fn(batch)
        loss.backward()
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
    seq_len = data["input_ids"].shape[1]
    gflops = matmul_gflops(repeats=3)  # the CPU may be shared: the ceiling as this worker saw it
    tokens_per_s = batch_size * seq_len / statistics.median(times) if times else None
    return {"side": side, "matmul_gflops": gflops, "step_s": times, "cpu_s": cpu_times, "tokens_per_s": tokens_per_s,
            "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_after_load_kb": rss_after_load,
            "losses": losses}


def profile_step(step, index, side, out_dir):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        loss = step(index)
    averages = prof.key_averages()
    print(f"--- {side}: top ops by self CPU time ---", file=sys.stderr)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    print(f"--- {side}: top ops by self CPU memory ---", file=sys.stderr)
    print(averages.table(sort_by="self_cpu_memory_usage", row_limit=15), file=sys.stderr)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out_dir / f"trace_{side}.json"))
    return loss


# ---------------------------------------------------------------------------------------------------------------
# the driver


def spawn(side, args, data_file) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--model", str(args.model), "--data-file", str(data_file),
               "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.profile == side:
        command += ["--profile", side]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{done.stderr[-4000:]}")
    if args.profile == side:
        print(done.stderr, file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF dir (default: models.fetch.fetch_smollm2())")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternations engine, hf")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    parser.add_argument("--sides", default="engine,engine_heap,hf",
                        help="engine_heap: the engine with mmap_activations=false (engine/host_memory.py)")
    parser.add_argument("--profile", choices=list(SIDES), default=None,
                        help="profile the first timed step of that side (printed, not timed)")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_worker(args.worker, Path(args.model), Path(args.data_file), args.batch_size, args.warmup,
                            args.steps, args.profile == args.worker, ROOT / "benchmarks" / "out")
        print(json.dumps(result))
        return

    from tqdm import tqdm
    from hippocrates.models.config import ModelConfig

    torch.set_num_threads(THREADS)
    if args.model is None:
        from hippocrates.models.fetch import fetch_smollm2
        args.model = fetch_smollm2()
    model_dir = Path(args.model)
    config = ModelConfig.from_file(model_dir / "config.json")
    rows = args.batch_size * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "rows.pt"
        torch.save(pack_medquad(model_dir, rows, args.seq_len), data_file)
        gflops = matmul_gflops()
        sides = args.sides.split(",")
        results = {side: [] for side in sides}
        for _ in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
            for side in sides:
                results[side].append(spawn(side, args, data_file))

    flops = lora_training_flops_per_token(config, args.seq_len, LORA_RANK)
    print(f"workload: {model_dir.name}, seq {args.seq_len} x batch {args.batch_size}, LoRA r={LORA_RANK} on "
          f"{len(TARGETS)} linears/block, fp32, {THREADS} threads; {args.rounds} rounds x {args.steps} steps "
          f"after {args.warmup} warmup")
    print(f"LoRA training: {flops / 1e9:.3f} GFLOP/token; 2048^3 fp32 matmul before the rounds: {gflops:.1f} GFLOP/s "
          f"-> ceiling {gflops * 1e9 / flops:.1f} tokens/s (each worker re-measures it after its steps)")
    summary = {}
    for side, runs in results.items():
        step_s = [s for r in runs for s in r["step_s"]]
        cpu_s = [s for r in runs for s in r["cpu_s"]]
        summary[side] = {
            "tps": args.batch_size * args.seq_len / statistics.median(step_s),
            "rounds": [r["tokens_per_s"] for r in runs],
            "cpu_s": statistics.median(cpu_s),
            "ceiling": statistics.median(r["tokens_per_s"] / (r["matmul_gflops"] * 1e9 / flops) for r in runs),
            "gflops": statistics.median(r["matmul_gflops"] for r in runs),
            "rss": max(r["peak_rss_kb"] for r in runs) / 2 ** 20,
            "load": max(r["rss_after_load_kb"] for r in runs) / 2 ** 20,
            "loss": runs[0]["losses"][0]}
    header = (f"{'side':11} {'tokens/s':>8} {'per round':>17} {'CPU s/step':>10} {'matmul GF/s':>11} "
              f"{'of ceiling':>10} {'peak RSS GB':>11} {'after load':>10} {'first loss':>10}")
    print(header)
    print("-" * len(header))
    for side, s in summary.items():
        per_round = "/".join(f"{x:.1f}" for x in s["rounds"])
        print(f"{side:11} {s['tps']:8.1f} {per_round:>17} {s['cpu_s']:10.1f} {s['gflops']:11.1f} {s['ceiling']:10.2f} "
              f"{s['rss']:11.2f} {s['load']:10.2f} {s['loss']:10.4f}")
    if {"engine", "hf"} <= summary.keys():
        speed = summary["engine"]["tps"] / summary["hf"]["tps"]
        memory = summary["engine"]["rss"] / summary["hf"]["rss"]
        paired = [e["tokens_per_s"] / h["tokens_per_s"] for e, h in zip(results["engine"], results["hf"])]
        cpu = summary["hf"]["cpu_s"] / summary["engine"]["cpu_s"]
        print(f"engine / hf: tokens/s {speed:.2f}x (target >= 1.15; per round "
              f"{'/'.join(f'{x:.2f}' for x in paired)}; by CPU seconds per step {cpu:.2f}x), "
              f"peak RSS {memory:.2f}x (target <= 0.50)")


if __name__ == "__main__":
    main()

"""The Python steps of benchmarks/gpu_check.sh (one subcommand per step; results go to a JSON Lines file).

    prepare DATA_DIR TOKENIZER_DIR INPUTS [--medquad-mb 4]   inputs for a machine without network (run here)
    model INPUTS OUT --shape smollm2|llama1b|toy              a random model (fixed seed) with the real tokenizer
    compare-train RESULTS TRITON_DIR TORCH_DIR [--tol 0.03]   loss curves and tokens/s of two trainer runs
    compare-eval RESULTS GPU_DIR CPU_DIR [--tol 0.05]         per-choice log-likelihoods, GPU bf16 vs CPU fp32
    hf RESULTS MODEL INPUTS --seq-len --batch --steps [--liger] transformers + peft (+ Liger) on the same text
    ours RESULTS RUN_DIR --label L --model MODEL              the trainer's tokens/s, peak memory, MFU
    summary RESULTS                                           the side-by-side table with ratios

MFU: FLOPs per trained token / (tokens/s x the bf16 matmul rate measured on this GPU in the same run, 8192^3).
LoRA training FLOPs per token: 4 x (linear weights, LM head included: forward + input gradient; the frozen weights
get no weight gradient) + 7 x layers x seq_len x hidden (causal attention: forward 4 N D, backward 10 N D, with
N = T^2 / 2 visible pairs per head). Adapter FLOPs are left out (under 2% at rank 16).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # overrides of SmolLM2-135M's config.json
    "smollm2": {},
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def append(results, record):
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def prepare(args):
    """INPUTS/smollm2 (config + tokenizer), INPUTS/data/corpus/medquad.jsonl (first answers up to --medquad-mb),
    INPUTS/data/eval/pubmedqa (the two PubMedQA files)."""
    data, tok, out = Path(args.data_dir), Path(args.tokenizer_dir), Path(args.inputs)
    (out / "smollm2").mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES + ("config.json",):
        shutil.copy(tok / name, out / "smollm2" / name)
    corpus = out / "data" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    budget, written = args.medquad_mb * 2 ** 20, 0
    with open(data / "corpus" / "medquad_qa.jsonl") as src, open(corpus / "medquad.jsonl", "w") as dst:
        for line in src:
            answer = json.loads(line).get("answer", "")
            if written + len(answer) > budget:
                break
            dst.write(json.dumps({"answer": answer}) + "\n")
            written += len(answer)
    pubmedqa = out / "data" / "eval" / "pubmedqa"
    pubmedqa.mkdir(parents=True, exist_ok=True)
    for name in ("ori_pqal.json", "test_ground_truth.json"):
        shutil.copy(data / "eval" / "pubmedqa" / name, pubmedqa / name)
    print(f"inputs in {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2 ** 20:.1f} MiB")


def make_model(args):
    from hippocrates.models.checkpoint import build_model, save_pretrained
    from hippocrates.models.config import ModelConfig
    inputs, out = Path(args.inputs), Path(args.out)
    hf = json.loads((inputs / "smollm2" / "config.json").read_text())
    hf.update(SHAPES[args.shape])
    config = ModelConfig.from_hf(hf)
    # bf16 storage: half the bytes to write, and the same weights for every reader (bf16 is exact in fp32)
    model = build_model(config, dtype=torch.bfloat16, device="cpu").init_weights(seed=args.seed)
    save_pretrained(model, out)
    for name in TOKENIZER_FILES:
        shutil.copy(inputs / "smollm2" / name, out / name)
    print(f"{args.shape}: {model.num_parameters() / 1e6:.1f}M parameters, seed {args.seed} -> {out}")


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def compare_train(args):
    a, b = _metrics(args.triton_dir), _metrics(args.torch_dir)
    worst = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))
    speed = [statistics.median(r["tokens_per_s"] for r in runs[1:] or runs) for runs in (a, b)]
    passed = len(a) == len(b) and len(a) > 0 and worst <= args.tol
    append(args.results, dict(section="train", steps=len(a), loss_first=[a[0]["loss"], b[0]["loss"]],
                              loss_last=[a[-1]["loss"], b[-1]["loss"]], max_rel_loss_diff=worst, tol=args.tol,
                              tokens_per_s_triton=speed[0], tokens_per_s_torch=speed[1],
                              speedup=speed[0] / speed[1], passed=passed))
    return 0 if passed else 1


def compare_eval(args):
    def samples(d):
        return {r["id"]: r for r in map(json.loads, (Path(d) / "samples.jsonl").read_text().splitlines())}
    gpu, cpu = samples(args.gpu_dir), samples(args.cpu_dir)
    common = sorted(set(gpu) & set(cpu))
    diffs = [abs(x - y) for i in common for x, y in zip(gpu[i]["loglikelihoods"], cpu[i]["loglikelihoods"])]
    worst = max(diffs) if diffs else float("inf")
    same = sum(gpu[i]["prediction"] == cpu[i]["prediction"] for i in common)
    largest = max((abs(v) for i in common for v in cpu[i]["loglikelihoods"]), default=1.0)
    passed = bool(common) and worst <= args.tol * max(1.0, largest)
    append(args.results, dict(section="eval", items=len(common), max_abs_loglik_diff=worst, tol_rel=args.tol,
                              same_prediction=same, passed=passed))
    return 0 if passed else 1


def matmul_rate(device):
    """bf16 TFLOP/s of an 8192^3 matmul on a GPU (fp32 2048^3 on a CPU), measured now."""
    if device.type != "cuda":
        a = torch.randn(1024, 1024)
        start = time.perf_counter()
        a @ a
        return 2 * 1024 ** 3 / (time.perf_counter() - start) * 1e-12
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * n ** 3 / (time.perf_counter() - start) * 1e-12


def flops_per_token(hf_config, seq_len):
    h, inter, layers = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["num_hidden_layers"]
    heads, kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    d = hf_config.get("head_dim") or h // heads
    linear = layers * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter) + h * hf_config["vocab_size"]
    return 4 * linear + 7 * layers * seq_len * heads * d


def _token_rows(model_dir, inputs, seq_len, batch, steps):
    from hippocrates.models import load_tokenizer
    tokenizer = load_tokenizer(model_dir)
    ids, need = [], seq_len * batch * steps
    with open(Path(inputs) / "data" / "corpus" / "medquad.jsonl") as f:
        for line in f:
            ids += tokenizer.encode(json.loads(line)["answer"], bos=True)
            if len(ids) >= need:
                break
    ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return torch.tensor(ids).view(steps, batch, seq_len)


def hf_side(args):
    """transformers + peft LoRA (r 16, alpha 32, every linear layer of the blocks), AdamW, bf16 on a GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    label = "hf+peft"
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
        label = "hf+peft+liger"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = _token_rows(args.model, args.inputs, args.seq_len, args.batch, args.steps).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        loss = model(input_ids=rows[step], labels=rows[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes
        times.append(time.perf_counter() - start)
    tokens_per_s = args.seq_len * args.batch / statistics.median(times[1:] or times)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    _perf_record(args, label, tokens_per_s, peak, dict(loss_first=losses[0], loss_last=losses[-1]))


def ours_side(args):
    runs = _metrics(args.run_dir)
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in runs[1:] or runs)
    _perf_record(args, args.label, tokens_per_s, max(r.get("peak_memory_mb") or 0 for r in runs),
                 dict(loss_first=runs[0]["loss"], loss_last=runs[-1]["loss"]))


def _perf_record(args, label, tokens_per_s, peak_mb, extra):
    hf_config = json.loads((Path(args.model) / "config.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rate = matmul_rate(device)
    mfu = tokens_per_s * flops_per_token(hf_config, args.seq_len) / (rate * 1e12)
    append(args.results, dict(section="perf", shape=args.shape, side=label, tokens_per_s=tokens_per_s,
                              peak_mb=peak_mb, mfu=mfu, matmul_tflops=rate, seq_len=args.seq_len, **extra))


def summary(args):
    records = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    lines = ["section results:"]
    for r in records:
        if r["section"] != "perf":
            lines.append(f"  [{'PASS' if r.get('passed') else 'FAIL'}] {r['section']}: "
                         + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                     if k not in ("section", "passed")))
    lines.append("CPT LoRA r16 training, side by side (ratio = ours / side; MFU against the bf16 matmul rate "
                 "measured in this run):")
    lines.append(f"  {'shape':<9}{'side':<16}{'tokens/s':>10}{'MFU':>7}{'peak MiB':>10}{'tok/s ratio':>12}"
                 f"{'mem ratio':>10}")
    for shape in dict.fromkeys(r["shape"] for r in records if r["section"] == "perf"):
        group = [r for r in records if r["section"] == "perf" and r["shape"] == shape]
        ours = next((r for r in group if r["side"].startswith("ours")), None)
        for r in group:
            ratio = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if ours else "-"
            mem = f"{ours['peak_mb'] / r['peak_mb']:.2f}x" if ours and r["peak_mb"] and ours["peak_mb"] else "-"
            peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-"
            lines.append(f"  {shape:<9}{r['side']:<16}{r['tokens_per_s']:>10.0f}{100 * r['mfu']:>6.1f}%{peak:>10}"
                         f"{ratio:>12}{mem:>10}")
    text = "\n".join(lines)
    print(text)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("data_dir")
    p.add_argument("tokenizer_dir")
    p.add_argument("inputs")
    p.add_argument("--medquad-mb", type=float, default=4.0)
    p = sub.add_parser("model")
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--shape", choices=SHAPES, default="smollm2")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("compare-train")
    p.add_argument("results")
    p.add_argument("triton_dir")
    p.add_argument("torch_dir")
    p.add_argument("--tol", type=float, default=0.03)
    p = sub.add_parser("compare-eval")
    p.add_argument("results")
    p.add_argument("gpu_dir")
    p.add_argument("cpu_dir")
    p.add_argument("--tol", type=float, default=0.05)
    for name in ("hf", "ours"):
        p = sub.add_parser(name)
        p.add_argument("results")
        if name == "ours":
            p.add_argument("run_dir")
            p.add_argument("--label", default="ours")
        p.add_argument("--model", required=True)
        p.add_argument("--inputs", default=None)
        p.add_argument("--shape", required=True)
        p.add_argument("--seq-len", type=int, default=2048)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--steps", type=int, default=6)
        p.add_argument("--liger", action="store_true")
    p = sub.add_parser("summary")
    p.add_argument("results")
    args = parser.parse_args(argv)
    handlers = {"prepare": prepare, "model": make_model, "compare-train": compare_train, "compare-eval": compare_eval,
                "hf": hf_side, "ours": ours_side, "summary": summary}
    return handlers[args.cmd](args) or 0


if __name__ == "__main__":
    sys.exit(main())

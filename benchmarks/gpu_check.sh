#!/usr/bin/env bash
# The first-GPU check: every section time-boxed, results written into the output folder as they come (at most 8
# files: tests.log, bench.log, train.log, eval.log, perf.log, results.jsonl, summary.txt), so a cut-off run still
# reports. Under 5 minutes on one H100/H200 (machine start not included).
#
#   benchmarks/gpu_check.sh [--cpu] [--inputs DIR] [--out DIR]
#
# Inputs (no network on the GPU machine; nothing of it is committed): DIR (default .gpu_check/inputs, ignored by
# git, about 10 MiB) holds the SmolLM2 config and tokenizer, a MedQuAD slice and the PubMedQA files. It is made here
# from the shared data (HIPPO_DATA_DIR, default ../shared/data) and the SmolLM2 tokenizer dir (HIPPO_TOKENIZER_DIR,
# default the fetched model) when missing:
#   python -m hippocrates.benchmarks.gpu_check prepare ../shared/data ~/.cache/hippocrates/smollm2/... .gpu_check/inputs
# and travels with the device tool's `carry: [".gpu_check"]`. Liger-Kernel is used where `import liger_kernel` works
# (e.g. a carried wheel installed into PYTHONPATH).
#
# Sections:
#   tests  the bf16/CUDA tests that skip on CPU (pytest -k bf16/gpu/cuda over kernels/)
#   bench  the kernel table (attention plain and packed [B, T, H, D], RMSNorm, LoRA r16/64/128 vs torch, fused CE
#          memory) with pass/fail against the targets
#   train  a SmolLM2-shaped model (seed 0, real tokenizer) trained 30 steps in bf16 with HIPPO_KERNELS=triton and
#          =torch: loss curves within 3% of each other (relative, per step), tokens/s of both
#   eval   50 PubMedQA items scored on the GPU (bf16) and on the CPU (fp32), same weights: per-choice
#          log-likelihoods within 5% of the largest magnitude
#   perf   the same CPT LoRA workload through transformers + peft (+ Liger): tokens/s, MFU, peak memory with ratios,
#          SmolLM2 shape (from the train run) and a random LLaMA-1B shape
# --cpu runs every section at toy size on the CPU (the test benchmarks/test_gpu_check.py runs it).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CPU=0
INPUTS="$ROOT/.gpu_check/inputs"
OUT="$ROOT/.gpu_check/out"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --inputs) INPUTS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --cpu, --inputs DIR, --out DIR)"; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # runs from the checkout: `import hippocrates` finds it
export PYTHONUNBUFFERED=1 HIPPO_CACHE_DIR="$WORK/cache" HIPPO_DATA_DIR="$INPUTS/data" TRITON_DEFAULT_FP_FUSION=1
PY="${PYTHON:-python3}"
HELP="$PY -m hippocrates.benchmarks.gpu_check"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

if [ ! -d "$INPUTS/smollm2" ]; then
  DATA="${HIPPO_SOURCE_DATA:-$ROOT/../shared/data}"
  TOK="${HIPPO_TOKENIZER_DIR:-$HOME/.cache/hippocrates/smollm2/SmolLM2-135M-Instruct}"
  $HELP prepare "$DATA" "$TOK" "$INPUTS" --medquad-mb 4 || { echo "gpu_check.sh: no inputs in $INPUTS"; exit 2; }
fi

if [ "$CPU" = 1 ]; then
  DEVICE=cpu; SHAPE=toy; SEQ=32; BATCH=2; STEPS=2; ITEMS=2; BIG=""; LIMIT=30; PERF_STEPS=2
  T_TESTS=300; T_BENCH=300; T_TRAIN=400; T_EVAL=300; T_PERF=300
  TESTS=(kernels/test_cross_entropy.py -k "retain_graph and torch")
  BENCH=(--ops rmsnorm --seqs 16 --skip-cpu-sides --no-compile-check)
  FIRST_SIDE=torch  # the interpreter is too slow for a whole model: both toy runs take the torch side
else
  DEVICE=cuda; SHAPE=smollm2; SEQ=2048; BATCH=8; STEPS=30; ITEMS=50; BIG=llama1b; LIMIT=20000; PERF_STEPS=6
  T_TESTS=60; T_BENCH=60; T_TRAIN=80; T_EVAL=40; T_PERF=55
  TESTS=(kernels -k "bfloat16 or bf16 or gpu or cuda")
  BENCH=(--ops attention,rmsnorm,lora,cross_entropy --seqs 4096)
  FIRST_SIDE=triton
fi
section() { echo "== $1 ($(date -u +%H:%M:%S), limit $2 s)"; }
status() { echo "{\"section\": \"$1\", \"passed\": $([ "$2" = 0 ] && echo true || echo false), \"log\": \"$1.log\"}" >> "$RESULTS"; }
cpt() {  # cpt OUT_DIR MODEL STEPS [key=value ...]
  local out="$1" model="$2" steps="$3"; shift 3
  $PY "$ROOT/train/cpt.py" model="$model" data="corpus/medquad.jsonl:text=answer" data.limit=$LIMIT \
    data.held_out=0 out_dir="$out" seq_len=$SEQ batch_size=$BATCH grad_accum=1 max_steps="$steps" seed=0 \
    lora.rank=16 checkpoint.save_every=0 eval.every=0 "$@"
}

section tests $T_TESTS
(cd "$ROOT" && timeout $T_TESTS $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}") > "$OUT/tests.log" 2>&1
status tests $?

section bench $T_BENCH
timeout $T_BENCH $PY -m hippocrates.benchmarks.bench_kernels "${BENCH[@]}" --out "$WORK/bench" \
  > "$OUT/bench.log" 2>&1
status bench $?

section train $T_TRAIN
$HELP model "$INPUTS" "$WORK/model_$SHAPE" --shape $SHAPE --seed 0 > "$OUT/train.log" 2>&1
export -f cpt
export PY ROOT SEQ BATCH LIMIT
{
  HIPPO_KERNELS=$FIRST_SIDE timeout $((T_TRAIN / 2)) bash -c 'cpt "$@"' _ "$WORK/run_triton" "$WORK/model_$SHAPE" $STEPS &&
  HIPPO_KERNELS=torch timeout $((T_TRAIN / 2)) bash -c 'cpt "$@"' _ "$WORK/run_torch" "$WORK/model_$SHAPE" $STEPS &&
  $HELP compare-train "$RESULTS" "$WORK/run_triton" "$WORK/run_torch" --tol 0.03
} >> "$OUT/train.log" 2>&1 || status train 1

section eval $T_EVAL
{
  for side in "$DEVICE bfloat16 gpu" "cpu float32 cpu"; do
    set -- $side
    [ "$DEVICE" = cpu ] && [ "$3" = gpu ] && set -- cpu float32 gpu  # --cpu: both sides on the CPU
    timeout $T_EVAL $PY -m hippocrates.eval.run --model "$WORK/model_$SHAPE" --tasks pubmedqa \
      --data-dir "$INPUTS/data" --limit $ITEMS --device "$1" --dtype "$2" --out "$WORK/eval_$3" --no-progress
  done
  $HELP compare-eval "$RESULTS" "$WORK/eval_gpu" "$WORK/eval_cpu" --tol 0.05
} > "$OUT/eval.log" 2>&1 || status eval 1

section perf $T_PERF
LIGER=$($PY -c "import liger_kernel" 2>/dev/null && echo 1 || echo 0)
{
  PERF=(--seq-len $SEQ --batch $BATCH --steps $PERF_STEPS --inputs "$INPUTS")
  [ -f "$WORK/run_triton/metrics.jsonl" ] &&
    $HELP ours "$RESULTS" "$WORK/run_triton" --label ours --model "$WORK/model_$SHAPE" --shape $SHAPE "${PERF[@]}"
  timeout $T_PERF $HELP hf "$RESULTS" --model "$WORK/model_$SHAPE" --shape $SHAPE "${PERF[@]}"
  [ "$LIGER" = 1 ] && timeout $T_PERF $HELP hf "$RESULTS" --model "$WORK/model_$SHAPE" --shape $SHAPE --liger \
    "${PERF[@]}"
  [ -n "$BIG" ] &&  # --cpu: the toy shape only
  $HELP model "$INPUTS" "$WORK/model_$BIG" --shape $BIG --seed 0 &&
  HIPPO_KERNELS=$FIRST_SIDE timeout $T_PERF bash -c 'cpt "$@"' _ "$WORK/run_big" "$WORK/model_$BIG" $PERF_STEPS &&
  $HELP ours "$RESULTS" "$WORK/run_big" --label ours --model "$WORK/model_$BIG" --shape "$BIG-shape" "${PERF[@]}"
  [ -n "$BIG" ] && timeout $T_PERF $HELP hf "$RESULTS" --model "$WORK/model_$BIG" --shape "$BIG-shape" "${PERF[@]}"
  echo "liger_kernel importable: $LIGER"
} > "$OUT/perf.log" 2>&1

$HELP summary "$RESULTS" > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
grep -q '"passed": false' "$RESULTS" && exit 1
exit 0

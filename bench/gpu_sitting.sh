#!/usr/bin/env bash
# Every row of bench_gpu.py in one time-boxed sitting on one GPU.
#
#   bench/gpu_sitting.sh OUT_DIR [COMPILE_DEADLINE_S] [TOTAL_S]
#
# XLA:GPU takes 1.5-4 min per ESC-Base program (autotuning), longer than the timing
# itself, so the programs are compiled first, in parallel processes that share one
# persistent compilation cache (phase 1, until COMPILE_DEADLINE_S: default 280), then
# timed one process at a time with nothing else on the card, each loading its
# programs from that cache (phase 2, until TOTAL_S: default 560). The compile rows
# are therefore compile times under contention (7 compiles on the machine's cores).
# A program whose compile missed the deadline is not timed. The largest batches come
# from the planned memory per clip at batch 36 (PLANNED; an H200's by default).
# Writes OUT_DIR/rows.jsonl (one JSON row each), OUT_DIR/logs.tar.gz and, from the
# bfloat16 step, OUT_DIR/train_step.trace.json.gz.
set -u
out=${1:?usage: bench/gpu_sitting.sh OUT_DIR [COMPILE_DEADLINE_S] [TOTAL_S]}
deadline=${2:-280}
total=${3:-560}
planned=${PLANNED:-float32:36:39.1,bfloat16:36:20.4}
cache=${CACHE:-/tmp/esc_gpu_cache}
logs=$(mktemp -d)
mkdir -p "$out"
rows=$out/rows.jsonl
bench=(python3 -u bench/bench_gpu.py --cache "$cache" --out "$rows" --planned "$planned")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# phase 1: compile everything at once
declare -A job=(
  [f32_36]="--dtypes float32 --train_batches 36 --skip peak,infer"
  [bf16_36]="--dtypes bfloat16 --train_batches 36 --skip peak,infer"
  [f32_max]="--dtypes float32 --train_batches max --skip peak,infer"
  [bf16_max]="--dtypes bfloat16 --train_batches max --skip peak,infer"
  [f32_inf1]="--dtypes float32 --infer_batches 1 --skip peak,train"
  [f32_inf64]="--dtypes float32 --infer_batches 64 --skip peak,train"
  [bf16_inf64]="--dtypes bfloat16 --infer_batches 64 --skip peak,train"
)
declare -A pid
for name in "${!job[@]}"; do
  # shellcheck disable=SC2086  # the job's flags are meant to split
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$deadline" "${bench[@]}" --compile_only ${job[$name]} \
    >"$logs/compile_$name.log" 2>&1 &
  pid[$name]=$!
done
declare -A ok
for name in "${!job[@]}"; do
  if wait "${pid[$name]}"; then ok[$name]=1; else echo "phase 1: $name did not compile in time"; fi
done
echo "phase 1 done after ${SECONDS} s"

# phase 2: time, one process at a time
run() {  # NAME TIMEOUT_CAP FLAGS...: runs bench_gpu.py within what is left of TOTAL_S
  local name=$1 cap=$2 left=$((total - SECONDS))
  shift 2
  ((left > 20)) || { echo "phase 2: no time left for $name"; return; }
  ((left < cap)) || left=$cap
  timeout "$left" "${bench[@]}" "$@" >"$logs/time_$name.log" 2>&1 || echo "phase 2: $name stopped (rc $?)"
}
[[ -n ${ok[f32_36]:-} ]] && run f32 200 --dtypes float32 --train_batches 36 --infer_batches 1,64
[[ -n ${ok[bf16_36]:-} ]] && run bf16 200 --dtypes bfloat16 --train_batches 36 --infer_batches 64 \
  --skip peak --peaks_from "$rows" --trace /tmp/esc_trace
[[ -n ${ok[f32_max]:-} ]] && run f32_max 120 --dtypes float32 --train_batches max --skip peak,infer --peaks_from "$rows"
[[ -n ${ok[bf16_max]:-} ]] && run bf16_max 120 --dtypes bfloat16 --train_batches max --skip peak,infer \
  --peaks_from "$rows"
echo "phase 2 done after ${SECONDS} s"
cp /tmp/esc_trace/train_step.trace.json.gz "$out/" 2>/dev/null
grep -h "^trace:\|^  .* ms " "$logs"/time_bf16.log 2>/dev/null
tar -czf "$out/logs.tar.gz" -C "$logs" .
cat "$rows" 2>/dev/null

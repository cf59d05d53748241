#!/usr/bin/env bash
# One prepared run of the CPU rows of benchmarks/RESULTS.md on the machine it runs on, with the
# checks of XLA:CPU's oneDNN path to AMX: whether oneDNN runs AMX kernels for XLA's dots, whether
# that path computes correctly (onednn_check.py), its speed, the masks against fp32 and the
# training loss against fp32's noise. Results (json + md,
# each with lscpu's model name and flags) go to benchmarks/results/cpu_<model name>/ (CPU_TAG
# overrides the folder's suffix), the output of every step to its log.txt. Steps run one at a time
# under the machine's CPU lock (/tmp/cpu.lock), each after `make setup`.
#
#     bash benchmarks/cpu_run.sh [step ...]      (default: every step, in the order of run_one)
set -u
cd "$(dirname "$0")/.."
make --no-print-directory setup >/dev/null || exit 1
PY=$PWD/.venv/bin/python
TAG=${CPU_TAG:-$(LC_ALL=C lscpu | sed -n 's/^Model name: *//p' | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '_' | sed 's/_$//')}
RES=$PWD/benchmarks/results/cpu_${TAG:-unknown}
mkdir -p "$RES"
export BENCH_RESULTS=$RES PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
LOG=$RES/log.txt
ONEDNN_DOTS="--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"
BF16=(env ONEDNN_DEFAULT_FPMATH_MODE=BF16)

step() {  # step NAME CMD...: one benchmark, its output appended to the log
  local name=$1 t0=$SECONDS; shift
  echo "=== $(date -u +%FT%TZ) $name: $*" | tee -a "$LOG"
  ( flock 9 && "$@" ) 9>/tmp/cpu.lock >>"$LOG" 2>&1
  echo "=== $name: exit $? after $(( SECONDS - t0 )) s" | tee -a "$LOG"
}

# Which oneDNN kernels XLA's dots run on (JAX alone: torch's oneDNN would print too). AMX shows as
# avx512_core_amx in the implementation names; `fpm:bf16` / `attr-fpmath:bf16` say bf16 was allowed.
amx_probe() {
  ONEDNN_VERBOSE=1 "${BF16[@]}" XLA_FLAGS="$ONEDNN_DOTS" "$PY" -c '
import jax, jax.numpy as jnp
x = jnp.ones((1024, 1024), jnp.float32)
print("sum", float(jax.jit(lambda a: a @ a)(x).sum()))' >"$RES/amx_probe.txt" 2>&1
  grep -o 'cpu,isa:.*' "$RES/amx_probe.txt"
  echo "oneDNN kernels of XLA's dot (count, implementation):"
  grep -o 'brg[a-z_]*:[a-z0-9_]*\|jit:[a-z0-9_]*\|gemm:[a-z0-9_]*\|fpm:[a-z0-9]*\|attr-fpmath:[a-z0-9]*' "$RES/amx_probe.txt" | sort | uniq -c
  if grep -q amx "$RES/amx_probe.txt"; then echo "AMX: used"; else echo "AMX: not used (see amx_probe.txt)"; fi
}

B=benchmarks
run_one() {
  case $1 in
  lscpu)        LC_ALL=C lscpu >"$RES/lscpu.txt"; sed -n 's/^Model name: *//p' "$RES/lscpu.txt" | tee -a "$LOG" ;;
  amx_probe)    step "$1" amx_probe ;;
  onednn_check) step "$1" "$PY" $B/onednn_check.py; step "$1 (bf16 fpmath)" "${BF16[@]}" "$PY" $B/onednn_check.py --name onednn_check_bf16 ;;
  matmul)       step "$1" "$PY" $B/bench_matmul.py ;;
  matmul_onednn) step "$1" "${BF16[@]}" XLA_FLAGS="$ONEDNN_DOTS" "$PY" $B/bench_matmul.py --name matmul_onednn_bf16 ;;
  sam2)         step "$1" "$PY" $B/bench_sam2.py ;;
  encoder)      step "$1" "$PY" $B/bench_encoder_grad.py ;;
  xla_options)  step "$1" "${BF16[@]}" "$PY" $B/bench_xla_options.py --variants "YNNPACK off (Eigen / XLA dots)" "fast math" \
                  "oneDNN dots" "oneDNN dot+eltwise" --cases 128x8:grad 1024x1:fwd 256x4:grad --repeats 3 --name xla_options_onednn_bf16 ;;
  bf16_numerics) step "$1" "${BF16[@]}" "$PY" $B/bf16_numerics.py --name bf16_numerics_onednn ;;
  bf16_training) step "$1" "$PY" $B/bf16_training.py ;;
  train_128)    step "$1" "$PY" $B/bench_train.py --image-size 128 --rounds 2 ;;
  train_512)    step "$1" "$PY" $B/bench_train.py --image-size 512 --rounds 2 ;;
  train_full)   step "$1" "$PY" $B/bench_train_full.py --sizes 128,512 --frames 4 --objects 2 --repeats 3 ;;
  safeclick)    step "$1" "$PY" $B/bench_safeclick.py ;;
  volume)       step "$1" "$PY" $B/bench_volume.py ;;
  interactive)  step "$1" "$PY" $B/bench_interactive.py --sizes 512 --slices 48 ;;
  memory_attention) step "$1" "$PY" $B/bench_memory_attention.py --repeats 3 ;;
  depthwise)    step "$1" "$PY" $B/bench_depthwise.py ;;
  *) echo "unknown step $1 (steps: lscpu amx_probe onednn_check matmul matmul_onednn sam2 encoder xla_options bf16_numerics" \
          "bf16_training train_128 train_512 train_full safeclick volume interactive memory_attention depthwise)" >&2; exit 2 ;;
  esac
}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(lscpu amx_probe onednn_check matmul matmul_onednn sam2 encoder xla_options bf16_numerics \
  bf16_training train_128 train_512 train_full safeclick volume interactive memory_attention depthwise)
for s in "${STEPS[@]}"; do run_one "$s"; done
echo "results in $RES"

#!/usr/bin/env bash
# One prepared run of the GPU measurements (issues 3 and 5), for a lent GPU machine whose image
# has jax[cuda], flax, optax, orbax and torch but not the rest of our requirements: those travel
# as py3.12 wheels / pure-Python packages in .gpu/ (git-ignored; made by benchmarks/gpu_packages.sh
# and sent with the device tool's carry). Each step has its own time limit (and none runs past
# DEADLINE), appends to $OUT/log.txt, and re-packs the results (json + md) into $OUT/results.tgz,
# so a run cut short still returns what it did. Arguments pick steps (names in run_one below).
#
#     OUT=/tmp/gpu_out bash benchmarks/gpu_run.sh [train_t_fp32 train_l_bf16 ...]
set -u
OUT=${OUT:-/tmp/gpu_out}
RES=/tmp/gpu_results
mkdir -p "$OUT" "$RES"
export BENCH_RESULTS=$RES PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
LOG=$OUT/log.txt
START=$(date +%s)

if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl >>"$LOG" 2>&1
  cp -r .gpu/pure/* /tmp/site/
  export PYTHONPATH=/tmp/site:$PWD
fi

DEADLINE=${DEADLINE:-530}  # seconds after START by which every step has ended (the lease is short)
step() {  # step LIMIT_S NAME CMD...: runs for at most LIMIT_S and never past DEADLINE
  local limit=$1 name=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "=== $name: skipped (deadline)" | tee -a "$LOG"; return; fi
  echo "=== [$(( $(date +%s) - START )) s] $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $(( $(date +%s) - START )) s" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, jax, flax, torch; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$LOG"

B=benchmarks
run_one() {
  case $1 in
  train_t_fp32) step 150 "train tiny fp32" python3 $B/bench_train.py --image-size 1024 --batch 8 --steps 10 --dtype float32 --features random --no-encoder-step ;;
  train_t_bf16) step 110 "train tiny bf16" python3 $B/bench_train.py --image-size 1024 --batch 8 --steps 10 --dtype bfloat16 --features random --no-encoder-step ;;
  train_t_enc)  step 200 "train tiny fp32, encoder in the step" python3 $B/bench_train.py --image-size 1024 --batch 8 --steps 10 --dtype float32 ;;
  train_l_fp32) step 130 "train large fp32" python3 $B/bench_train.py --model sam2.1_hiera_l --image-size 1024 --batch 8 --steps 10 --dtype float32 --features random --no-encoder-step ;;
  train_l_bf16) step 130 "train large bf16" python3 $B/bench_train.py --model sam2.1_hiera_l --image-size 1024 --batch 8 --steps 10 --dtype bfloat16 --features random --no-encoder-step ;;
  train_t_chunked) step 150 "train tiny bf16, chunked attention 2^26" env SAFECLICK_ATTENTION=chunked SAFECLICK_ATTENTION_MAX_SCORES=67108864 python3 $B/bench_train.py --image-size 1024 --batch 8 --steps 10 --dtype bfloat16 --features random --no-encoder-step ;;
  train_t_cudnn) step 110 "train tiny bf16, cuDNN flash attention" env SAFECLICK_ATTENTION=cudnn python3 $B/bench_train.py --image-size 1024 --batch 8 --steps 10 --dtype bfloat16 --features random --no-encoder-step ;;
  train_l_cudnn) step 130 "train large bf16, cuDNN flash attention" env SAFECLICK_ATTENTION=cudnn python3 $B/bench_train.py --model sam2.1_hiera_l --image-size 1024 --batch 8 --steps 10 --dtype bfloat16 --features random --no-encoder-step ;;
  overhead_cudnn) step 120 "safeclick overhead bf16, cuDNN flash attention" env SAFECLICK_ATTENTION=cudnn python3 $B/bench_safeclick.py --image-size 1024 --train-batch 0 --repeats 10 --dtype bfloat16 --name safeclick_overhead_gpu_bf16_cudnn ;;
  step_memory) step 200 "step memory (XLA buffer assignment on the GPU)" python3 $B/step_memory.py ;;
  safeclick_fp32) step 200 "safeclick fp32" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 $B/bench_safeclick.py --image-size 1024 --train-image-size 1024 --train-batch 8 --repeats 10 --name safeclick_gpu ;;
  overhead_fp32) step 120 "safeclick overhead fp32" python3 $B/bench_safeclick.py --image-size 1024 --train-batch 0 --repeats 10 --name safeclick_overhead_gpu ;;
  overhead_bf16) step 120 "safeclick overhead bf16" python3 $B/bench_safeclick.py --image-size 1024 --train-batch 0 --repeats 10 --dtype bfloat16 --name safeclick_overhead_gpu_bf16 ;;
  bf16_numerics) step 90 "bf16 numerics" python3 $B/bf16_numerics.py --image-size 1024 ;;
  interactive) step 240 "interactive session vs SAM2VideoPredictor, tiny, 512 and 1024 px, 48 slices" python3 $B/bench_interactive.py --sizes 512,1024 --slices 48,48 ;;
  volume) step 150 "propagation slices/s vs SAM2VideoPredictor, tiny 1024 px, 48 slices" python3 $B/bench_volume.py --image-size 1024 --slices 48 --hw 512 ;;
  train_full_bf16) step 300 "full training step vs SAM2Train + loss + AdamW, tiny bf16, 512 px x 8 frames x 3 objects" \
            python3 $B/bench_train_full.py --sizes 512 --frames 8 --objects 3 --dtype bfloat16 --repeats 5 ;;
  train_full_fp32) step 240 "full training step vs SAM2Train + loss + AdamW, tiny fp32, 128 and 512 px x 4 frames" \
            python3 $B/bench_train_full.py --sizes 128,512 --frames 4 --objects 2 --repeats 5 ;;
  parity) step 150 "parity tests on GPU (highest precision)" env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
            python3 -m pytest -q -x -p no:cacheprovider tests/test_safeclick_parity.py tests/test_attention.py ;;
  *) echo "unknown step $1" | tee -a "$LOG" ;;
  esac
}
# Steps in order of priority (arguments pick and order them). Compiles dominate on a GPU: seen on
# an H200, the SafeClick train step at 1024 px took 45 s to compile, an encoder + step over 150 s.
for s in "${@:-train_t_cudnn train_l_bf16 train_l_fp32 overhead_fp32 train_t_chunked interactive volume overhead_bf16}"; do
  for one in $s; do run_one "$one"; done
done
grep -h "^|\|^Machine" "$RES"/*.md | tee -a "$LOG"

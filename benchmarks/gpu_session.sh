#!/usr/bin/env bash
# One device call: the VOC step-time benchmark (issue 7) in bfloat16 with a profile of where the time goes, then in
# float32 inside a 40 GB memory pool, in 5 minutes (BUDGET_S).
#
#   bash benchmarks/fetch_wheels.sh                 # here, once: .whl/ (about 11 MB, ignored)
#   device run, carry [".whl"] (and ".carry/weights" when the CamVid run follows), timeout_s 330:
#     STPG_COMMIT=<git rev-parse --short HEAD> bash benchmarks/gpu_session.sh
#
# Writes into $OUT: nvidia_smi.txt, step_time_bf16.{json,log}, step_time_f32.{json,log}, and profile_bf16.tgz with
# PROFILE_TGZ=1. bfloat16 runs first, with (PROFILE=1, the default) a jax.profiler trace of 2 steps whose summary
# (where the device time goes) step_time.py writes into the log and the JSON; BF16_ARGS adds arguments.
# float32 runs with the allocator's pool capped at F32_POOL_GIB (default 37.25 GiB = 40 GB, the memory
# target; 0 = no cap), so a run that completes shows the float32 VOC step fits in 40 GB; F32_REMAT=1 runs it with
# model.remat=True (activations recomputed in the backward pass). Each run writes its JSON after every phase, so a
# run stopped by its timeout keeps what it measured. AB_OVERRIDES (e.g. model.bn_statistics=joined) times bfloat16
# once more with those config overrides (no profile), before float32.
# BUDGET_S (default 300 s) bounds the whole script (on the H200 at de77a35 each process took about 35 s to
# initialise and 70 s to compile, so bfloat16 with its profile needed 150 s and float32 another 125 s); what is left
# of it at the end times the evaluation protocol.
set -uo pipefail
START=$SECONDS
BUDGET_S=${BUDGET_S:-300}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export STPG_COMMIT=${STPG_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

CONFIG=${CONFIG:-configs/voc_blender.py:1_4}
STEP_ARGS=${STEP_ARGS:-}   # e.g. --tiny, to try this script on a CPU (with SKIP_INSTALL=1)
# Wheels are installed into KEEP (/tmp/stpg_keep), which stays on the machine while it is warm (the repository's
# ignored folders do not: the working tree is sent again with each call), so a following call (gpu_camvid.sh) finds
# them; so does the ImageNet weights file when it was carried here as .carry/weights.
KEEP=${KEEP:-/tmp/stpg_keep}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  if [ -d .whl ] && [ ! -f "$KEEP/site/.installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KEEP/site" .whl/*.whl \
      && touch "$KEEP/site/.installed" || { echo "wheel install failed"; exit 1; }
  fi
  export PYTHONPATH=$KEEP/site:$PWD
  if [ -f .carry/weights/resnet50_imagenet.npz ]; then
    mkdir -p "$KEEP/weights" && cp .carry/weights/resnet50_imagenet.npz "$KEEP/weights/" \
      && echo "weights kept in $KEEP/weights for the next call"
  fi
fi

{ date -u; nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv; } > "$OUT/nvidia_smi.txt" 2>&1
head -n 20 "$OUT/nvidia_smi.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" || exit 1
echo "setup took $((SECONDS - START))s"

left() { echo $((BUDGET_S - (SECONDS - START))); }

BF16_ARGS=${BF16_ARGS:-}
PROFILE_ARGS=()
[ "${PROFILE:-1}" = 1 ] && PROFILE_ARGS=(--profile /tmp/stpg_profile --profile_steps 2)
T=$(( $(left) - 80 )); [ "$T" -gt 170 ] && T=170
echo "== bfloat16 (timeout ${T}s)"
timeout -k 5 "$T" python3 benchmarks/step_time.py --config="$CONFIG,model.dtype=bfloat16" $STEP_ARGS \
  --steps 30 --warmup 5 $BF16_ARGS "${PROFILE_ARGS[@]}" --out "$OUT/step_time_bf16.json" 2>&1 | tee "$OUT/step_time_bf16.log"
if [ "${PROFILE_TGZ:-0}" = 1 ] && [ -d /tmp/stpg_profile ]; then
  tar -C /tmp -czf "$OUT/profile_bf16.tgz" stpg_profile && ls -la "$OUT/profile_bf16.tgz"
fi

if [ -n "${AB_OVERRIDES:-}" ]; then
  T=$(( $(left) - 80 )); [ "$T" -gt 150 ] && T=150
  if [ "$T" -gt 90 ]; then
    echo "== bfloat16 with $AB_OVERRIDES (timeout ${T}s)"
    timeout -k 5 "$T" python3 benchmarks/step_time.py --config="$CONFIG,$AB_OVERRIDES,model.dtype=bfloat16" $STEP_ARGS \
      --steps 30 --warmup 5 --out "$OUT/step_time_bf16_ab.json" 2>&1 \
      | tee "$OUT/step_time_bf16_ab.log"
  else
    echo "== bfloat16 with $AB_OVERRIDES skipped: ${T}s left for it"
  fi
fi

# The float32 pool: F32_POOL_GIB of the card's memory, as the fraction XLA's allocator takes.
POOL=${F32_POOL_GIB:-37.25}
TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
if [ "$POOL" != 0 ] && [ -n "$TOTAL_MIB" ]; then
  FRACTION=$(python3 -c "print(f'{min(0.95, $POOL * 1024 / $TOTAL_MIB):.4f}')")
  echo "== float32 pool capped at ${POOL} GiB of ${TOTAL_MIB} MiB: XLA_PYTHON_CLIENT_MEM_FRACTION=$FRACTION"
else
  FRACTION=""
fi
T=$(left)
if [ "$T" -gt 30 ]; then
  echo "== float32 (timeout ${T}s)"
  F32_CONFIG=$CONFIG; [ "${F32_REMAT:-0}" = 1 ] && F32_CONFIG="$CONFIG,model.remat=True"
  env ${FRACTION:+XLA_PYTHON_CLIENT_MEM_FRACTION=$FRACTION} timeout -k 5 "$T" python3 benchmarks/step_time.py --config="$F32_CONFIG,model.dtype=float32" $STEP_ARGS \
    --steps 20 --warmup 3 --out "$OUT/step_time_f32.json" 2>&1 | tee "$OUT/step_time_f32.log"
  echo "float32 exit status ${PIPESTATUS[0]} (non-zero with RESOURCE_EXHAUSTED above = does not fit the pool)"
else
  echo "== float32 skipped: ${T}s left"
fi
# Last, with what time is left: the evaluation protocol's throughput (benchmarks/eval_speed.py) on
# VOC-sized images, one window each (EVAL_CONFIG / EVAL_ARGS to change it).
T=$(( $(left) - 5 ))
if [ "$T" -gt 60 ]; then
  echo "== evaluation throughput (timeout ${T}s)"
  timeout -k 5 "$T" python3 benchmarks/eval_speed.py --config="${EVAL_CONFIG:-$CONFIG}" \
    ${EVAL_ARGS:---size 375x500 --images 64 --warmup 4} --out "$OUT/eval_speed.json" 2>&1 | tee "$OUT/eval_speed.log"
else
  echo "== evaluation throughput skipped: ${T}s left"
fi
echo "total $((SECONDS - START))s"

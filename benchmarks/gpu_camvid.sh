#!/usr/bin/env bash
# The CamVid 1/8 experiment (supervised, mean teacher, STPG; issue 7) on the GPU machine in one call: 5 minutes for
# 600 steps on an H200.
#
# The three runs start together on the one GPU (experiment.py --parallel), so that their start-up and XLA
# compilation (each about a minute per R50 run on the H200; BENCHMARKS.md, History) overlap instead of being paid
# three times. The dataset is prepared once before they start. Each run preallocates its share of the GPU's memory
# (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.9 / 3 each by default, MEM_FRACTION=0.3 sets it),
# computes in DTYPE (bfloat16; parameters stay float32) and loads its batches with data.workers=WORKERS (4): 3 x 4
# loader processes beside the 3 trainers fit the 16 cores.
# The per-method wall times overlap: they are not solo times, and the results say so. PARALLEL=0 runs the methods one
# after another (paying start-up and compilation three times). TIMEOUT_S (480) bounds the experiment; when it
# expires the runs are stopped and the results file and the train logs are still written.
#
# The data (37 MB) and the ImageNet weights (46 MB) exceed one call's 64 MiB together, so they travel in two calls.
# The repository's ignored folders do not stay on the machine from one call to the next (the working tree is sent
# again), but /tmp does while the machine is warm (30 s after a call): the first call leaves the installed wheels and
# the weights in KEEP (/tmp/stpg_keep), and this script takes from there whatever was not carried with it.
#   here:  bash benchmarks/fetch_wheels.sh; echo /.carry/ >> .git/info/exclude
#          mkdir -p .carry/weights && cp -r ../shared/data/camvid .carry/camvid \
#            && cp ../shared/weights/resnet50_imagenet.npz .carry/weights/
#   call 1, carry [".whl", ".carry/weights"]:  bash benchmarks/gpu_session.sh   (it keeps both in KEEP)
#   call 2 at once, carry [".carry/camvid"], timeout_s 540:  STPG_COMMIT=<sha> bash benchmarks/gpu_camvid.sh
# (A machine that went back in between has lost KEEP: then carry .whl and .carry/weights again and call 1 again.)
# On 2026-11-27 on an H200 the three 600-step runs took 296 s together (BENCHMARKS.md, History).
# Other training seeds: SEEDS=0,1,2 (each seed's three runs together, one seed after another).
#
# Writes into $OUT: camvid_table.{md,json,png}, split_labeled.txt and each run's train log.
set -uo pipefail
START=$SECONDS
STEPS=${STEPS:-600}
WORKERS=${WORKERS:-4}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export STPG_COMMIT=${STPG_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

KEEP=${KEEP:-/tmp/stpg_keep}
SITE=$KEEP/site
if [ ! -f "$SITE/.installed" ]; then
  [ -d .whl ] || { echo ".whl/ missing and no wheels installed in $SITE: carry .whl (bash benchmarks/fetch_wheels.sh here)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && touch "$SITE/.installed" || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=$SITE:$PWD
# Each of the data and the weights: carried with this call (.carry/...) or left in KEEP by an earlier call, then
# linked as .carry/..., so that the commands stay the same.
link() {
  [ -e ".carry/$1/$2" ] && return 0
  [ -e "$KEEP/$1/$2" ] || return 1
  mkdir -p .carry && rm -rf ".carry/$1" && ln -s "$KEEP/$1" ".carry/$1"
}
link camvid train.txt || { echo "CamVid missing: carry .carry/camvid (see the top of this script)"; exit 1; }
link weights resnet50_imagenet.npz \
  || { echo "weights missing in .carry/weights and $KEEP/weights: carry .carry/weights (see the top of this script)"; exit 1; }
DATA=.carry/camvid
WEIGHTS=.carry/weights
echo "data: $DATA, weights: $WEIGHTS/resnet50_imagenet.npz, packages: $SITE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

ROOT=/tmp/camvid_exp
rm -rf "$ROOT"
OVERRIDES="data.root=$DATA,model.pretrained=$WEIGHTS/resnet50_imagenet.npz,data.workers=$WORKERS"
OVERRIDES+=",model.dtype=${DTYPE:-bfloat16}"  # bfloat16 compute (float32 parameters) for all three methods
OVERRIDES+=",${EXTRA_OVERRIDES:-log_every_steps=50}"
MODE_ARGS=(--parallel)
[ "${PARALLEL:-1}" = 1 ] || MODE_ARGS=(--no-parallel)
[ -n "${MEM_FRACTION:-}" ] && export XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION  # each run's share
# SIGTERM at TIMEOUT_S: the script stops its runs (SIGTERM, SIGKILL 5 s later) and writes the results within the 10 s.
timeout -k 10 "${TIMEOUT_S:-480}" python3 benchmarks/experiment.py --config=configs/camvid.py:1_8 "${MODE_ARGS[@]}" \
  --methods "${METHODS:-supervised,mean_teacher,stpg}" --seeds "${SEEDS:-0}" --steps "$STEPS" --no-plot \
  --workdir_root "$ROOT" --out "$OUT" \
  --overrides "$OVERRIDES"
rc=$?
for log in "$ROOT"/*_seed*/train.log; do
  [ -f "$log" ] && cp "$log" "$OUT/train_$(basename "$(dirname "$log")").log"
done
for split in "$ROOT"/*_seed*/split_labeled.txt; do cp "$split" "$OUT/" && break; done
echo "exit status $rc, total $((SECONDS - START))s"
exit $rc

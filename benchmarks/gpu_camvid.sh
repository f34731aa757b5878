#!/usr/bin/env bash
# The CamVid 1/8 experiment (supervised, mean teacher, STPG; issue 7) on the GPU machine, in under 6 minutes.
#
# The data (37 MB) and the ImageNet weights (46 MB) exceed one call's 64 MiB together, so they travel in two calls
# into ignored folders, which a warm machine keeps between calls (echo /.carry/ >> .git/info/exclude first):
#   here:  mkdir -p .carry/weights && cp -r ../shared/data/camvid .carry/camvid \
#            && cp ../shared/weights/resnet50_imagenet.npz .carry/weights/
#   call 1 (e.g. with gpu_session.sh): carry [".whl", ".carry/weights"]
#   call 2: carry [".carry/camvid"], timeout_s 420:  STPG_COMMIT=<sha> STEPS=300 bash benchmarks/gpu_camvid.sh
# (A machine that went back in between has lost .carry/weights and .site: then carry them again.)
#
# Writes into $OUT: camvid_results.{md,json}, commands.txt, split_labeled.txt, and the three train logs.
set -uo pipefail
START=$SECONDS
STEPS=${STEPS:-300}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export STPG_COMMIT=${STPG_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

if [ ! -f .site/.installed ]; then
  [ -d .whl ] || { echo ".whl/ missing: carry it (bash benchmarks/fetch_wheels.sh here)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    && touch .site/.installed || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=$PWD/.site:$PWD
for f in .carry/camvid/train.txt .carry/weights/resnet50_imagenet.npz; do
  [ -e "$f" ] || { echo "missing $f: carry it (see the top of this script)"; ls -la .carry 2>&1; exit 1; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

ROOT=/tmp/camvid_exp
rm -rf "$ROOT"
timeout -k 10 "${TIMEOUT_S:-390}" python3 benchmarks/camvid_experiment.py --methods "${METHODS:-supervised,mean_teacher,stpg}" \
  --steps "$STEPS" --workdir_root "$ROOT" --out "$OUT" \
  --overrides "data.root=.carry/camvid,model.pretrained=.carry/weights/resnet50_imagenet.npz,${EXTRA_OVERRIDES:-log_every_steps=50}"
rc=$?
for m in supervised mean_teacher stpg; do
  [ -f "$ROOT/$m/train.log" ] && cp "$ROOT/$m/train.log" "$OUT/train_$m.log"
done
rm -f "$OUT/split_unlabeled.txt"  # derivable from split_labeled.txt; keeps $OUT within its 8 files
echo "exit status $rc, total $((SECONDS - START))s"
exit $rc

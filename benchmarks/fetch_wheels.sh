#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the GPU machine's image lacks for `import stpg_jax.train` and
# `python launch.py` (Python 3.12, manylinux x86_64). The image already has jax, jaxlib + CUDA plugin, flax, optax,
# orbax-checkpoint, numpy, scipy, pillow, absl-py, etils, fsspec, pyarrow, psutil, requests, tqdm, wrapt, six,
# cloudpickle, pyyaml, attrs, humanize, simplejson, rich, typing-extensions, zipp and torch.
# Versions are the ones this project's tests run with. protobuf is carried too: tensorflow-metadata's generated
# code needs a runtime >= 6.31, and this pins the combination tested here.
#
#   bash benchmarks/fetch_wheels.sh            # run in the repository root; .whl/ is ignored via .git/info/exclude
#
# On the GPU machine (see benchmarks/gpu_session.sh):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/stpg_keep/site .whl/*.whl
#   export PYTHONPATH=/tmp/stpg_keep/site:$PWD   (gpu_session.sh does both)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  tensorflow-datasets==4.9.10
  array-record==0.8.6
  dm-tree==0.1.10
  immutabledict==4.3.1
  simple-parsing==0.1.9
  docstring-parser==0.18.0
  tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0
  protobuf==7.36.2
  termcolor==3.3.0
  toml==0.10.2
  grain==0.2.18
  portpicker==1.6.0
  ml-collections==1.1.0
  tensorboardX==2.6.5
  importlib-resources==7.1.0
)
# Published as a source archive only (pure Python): built into a wheel here.
SDIST_ONLY=(promise==2.3)

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qxF '/.site/' .git/info/exclude 2>/dev/null || echo '/.site/' >> .git/info/exclude

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
python3 -m pip wheel -q --no-deps -w .whl "${SDIST_ONLY[@]}"

echo "wheels in .whl/:"
ls -1 .whl
du -sh .whl

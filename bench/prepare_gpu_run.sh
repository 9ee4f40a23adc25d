#!/usr/bin/env bash
# Prepare the one GPU run (bench/gpu_speed.py) on this machine, before asking for the H200.
#
# The lent machine has Python 3.12 and torch, peft, transformers, pyyaml, packaging, but no diffusers,
# cache-dit or bitsandbytes, and no network (../shared/GPU.md, .library/device/KINDS.md); and
# ../shared does not travel with the working tree. So: wheels into .whl/, the baseline into .gpu/
# (both git-ignored; name them in `carry`). About 50 MB together, under the 64 MiB a call may carry.
# No importlib_metadata: diffusers uses the standard library's on Python >= 3.8, and 10.2.0 imports
# lazy-importer, which that machine lacks.
#
#     bash bench/prepare_gpu_run.sh            # then the command printed at the end
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl .gpu
# The H200's interpreter, not this one: cp312 manylinux x86_64 wheels only, no dependencies pulled in
# (the rest is there already; two versions of one package would stop the install).
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 cache-dit==1.5.3 bitsandbytes==0.50.2
cp ../shared/bench/diffusers_baseline.py .gpu/
du -ch .whl .gpu | tail -1
cat <<'RUN'
Device command (carry [".whl", ".gpu"], timeout_s 600):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
  && timeout -s TERM 560 python3 bench/gpu_speed.py --out $OUT --budget 520 --baseline .gpu/diffusers_baseline.py 2>&1 | tee $OUT/log.txt
RUN

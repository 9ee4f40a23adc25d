#!/usr/bin/env bash
# The two commands a newcomer needs, on a fresh machine with Python 3.11:
#   ./run.sh predict -i prompt="a large blue square on a white background" -i model=dev \
#     -i aspect_ratio=custom -i width=256 -i height=256                # the real Cog server, built-in flux-mini
#   ./run.sh train -i input_images=@photos.zip -i steps=20              # LoRA training through Cog (train.py)
#   ./run.sh test                                                        # the test suite
# Each installs what it needs first (a .venv here, pinned packages) and builds the tiny model if absent.
set -euo pipefail
cd "$(dirname "$0")"

install() {
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  # Reinstall only when the pins change (the stamp holds a hash of both requirement files).
  stamp=.venv/.requirements-installed
  want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements-dev.txt
    echo "$want" > "$stamp"
  fi
}

with_tiny_model() {
  # Without an explicit weights folder, run on a built-in small model and never download: flux-mini
  # (trained on coloured shapes, committed under weights/flux-mini; rebuild: python -m toys.mini.build)
  # when present, else the random tiny model. The helper models (safety checker, autocaption) come in
  # tiny versions from weights/tiny either way.
  if [ -z "${FLUX_WEIGHTS_DIR:-}" ]; then
    if [ -f weights/flux-mini/FLUX.1-dev/model_index.json ] && [ -f weights/flux-mini/FLUX.1-schnell/model_index.json ]; then
      export FLUX_WEIGHTS_DIR="$PWD/weights/flux-mini"
    else
      .venv/bin/python -m toys.tiny weights/tiny --if-missing >/dev/null
      export FLUX_WEIGHTS_DIR="$PWD/weights/tiny"
    fi
    .venv/bin/python -m toys.tiny_helpers weights/tiny --if-missing >/dev/null
    export FLUX_HELPER_WEIGHTS_DIR="$PWD/weights/tiny"
    export FLUX_ALLOW_DOWNLOAD="${FLUX_ALLOW_DOWNLOAD:-0}" FLUX_AUTOCAPTION_MAX_TOKENS="${FLUX_AUTOCAPTION_MAX_TOKENS:-16}"
  fi
}

command=${1:-}
shift || true
case "$command" in
  predict|train)
    install
    with_tiny_model
    exec .venv/bin/python scripts/cog_local.py "$command" "$@"
    ;;
  test)
    install
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    sed -n '2,6p' "$0"
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The two commands a newcomer needs, on a fresh machine with Python 3.11:
#   ./run.sh predict -i prompt="a large blue square on a white background" -i model=dev \
#     -i aspect_ratio=custom -i width=256 -i height=256                # the real Cog server, built-in flux-mini
#   ./run.sh train -i input_images=@photos.zip -i steps=20              # LoRA training through Cog (train.py)
#   ./run.sh test                                                        # the test suite
#   ./run.sh push r8.im/<you>/<model>                                    # cog push, as README says
# Each installs what it needs first (a .venv here, pinned packages) and builds the tiny model if absent.
set -euo pipefail
cd "$(dirname "$0")"

# The coglet the tests run; `cog build`/`cog push` install the newest one unless told (COGLET_WHEEL).
COGLET_PIN=$(sed -n 's/^coglet==\([^ ;#]*\).*/\1/p' requirements-dev.txt)

install() {
  if [ ! -x .venv/bin/python ]; then
    # The environment lives outside the checkout and .venv links to it: `cog build --separate-weights`
    # walks the checkout without following links, and would take torch's libraries for model weights.
    home="${FLUX_VENV_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cog-flux}/venv-$(pwd -P | sha256sum | cut -c1-12)"
    python3 -m venv "$home"
    ln -sfn "$home" .venv
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
  build|push)
    # The image the tests ran: their coglet, and the base weights in a layer of their own.
    if [ -d .venv ] && [ ! -L .venv ]; then
      echo ".venv is a folder inside the checkout: cog would take torch's libraries in it for model weights." >&2
      echo "Move it out once: rm -rf .venv && ./run.sh test" >&2
      exit 1
    fi
    COGLET_WHEEL="pypi:$COGLET_PIN" exec cog "$command" --separate-weights "$@"
    ;;
  *)
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Sets up the runtime venv and runs one TTS job from test_input.json on the embedded defaults
# (local storage in ./storage, f5-tts's built-in example voice). The first run downloads about
# 1.4 GB of models into the model cache unless they are pre-loaded (python -m f5worker.preload --volume).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv}"
scripts/setup.sh
exec "$VENV/bin/python" runpod-handler.py "$@"

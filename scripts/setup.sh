#!/usr/bin/env bash
# Creates (or reuses) the virtual environment with the pinned dependencies.
# Usage: scripts/setup.sh [--dev]     VENV=path overrides the location (default: .venv).
# A venv whose lock files are unchanged since it was built is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
want_dev=0; [ "${1:-}" = "--dev" ] && want_dev=1
stamp_src="requirements-torch.txt requirements.txt"; [ $want_dev = 1 ] && stamp_src="$stamp_src requirements-dev.txt"
stamp=$(cat $stamp_src | sha256sum | cut -c1-16)
if [ -f "$VENV/.f5worker-stamp" ] && grep -qx "$stamp" "$VENV/.f5worker-stamp"; then
  exit 0
fi
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, with its CUDA runtime wheels; then the lock without dependency resolution.
"$VENV/bin/python" -m pip install -q -r requirements-torch.txt
"$VENV/bin/python" -m pip install -q --no-deps -r requirements.txt
[ $want_dev = 1 ] && "$VENV/bin/python" -m pip install -q --no-deps -r requirements-dev.txt
"$VENV/bin/python" -m pip check >/dev/null 2>&1 || true  # f5-tts's gradio/torchcodec are left out on purpose
echo "$stamp" >> "$VENV/.f5worker-stamp"

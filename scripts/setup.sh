#!/usr/bin/env bash
# Creates (or reuses) the virtual environment with the pinned dependencies.
# Usage: scripts/setup.sh [--dev]     VENV=path overrides the location (default: .venv).
# A venv is reused as it is while the lock files it was built from are unchanged (a --dev venv
# also serves a runtime run); when the runtime locks change a venv this script made is built
# afresh, so nothing a lock no longer names stays installed (one made otherwise is installed into). Its stamp is written only once an install has completed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
want_dev=0; [ "${1:-}" = "--dev" ] && want_dev=1
runtime="runtime $(cat requirements-torch.txt requirements.txt | sha256sum | cut -c1-16)"
dev="dev $(sha256sum < requirements-dev.txt | cut -c1-16)"
want="$runtime"; [ $want_dev = 1 ] && want="$runtime $dev"
stamp_file="$VENV/.f5worker-stamp"
have=$(head -n 1 "$stamp_file" 2>/dev/null || true)
case "$have" in
  "$want"|"$want $dev") exit 0 ;;  # as wanted, or a dev venv of these locks for a runtime run
esac
case "$have" in
  "$runtime"*) ;;  # the runtime set is current: only the dev tools are added
  # other locks, or an unfinished install: built afresh, if this script made it (.f5worker-made)
  *) if [ -f "$VENV/pyvenv.cfg" ] && [ -f "$VENV/.f5worker-made" ]; then rm -rf "$VENV"; fi ;;
esac
rm -f "$stamp_file"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV" && touch "$VENV/.f5worker-made"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, with its CUDA runtime wheels; then the lock without dependency resolution.
"$VENV/bin/python" -m pip install -q -r requirements-torch.txt
"$VENV/bin/python" -m pip install -q --no-deps -r requirements.txt
[ $want_dev = 1 ] && "$VENV/bin/python" -m pip install -q --no-deps -r requirements-dev.txt
"$VENV/bin/python" -m pip check >/dev/null 2>&1 || true  # f5-tts's gradio/torchcodec are left out on purpose
echo "$want" > "$stamp_file"

#!/usr/bin/env bash
# One run on a GPU machine: the GPU tests, then the bench (stock f5-tts and the worker side by side),
# everything under $OUT (default /tmp/out), a short summary table printed at the end.
#
# Reproduce on any GPU machine (NVIDIA, CUDA; from the repository root):
#   with a package index:    scripts/setup.sh --dev && bash bench/device_run.sh      (uses .venv)
#   without one (offline):   scripts/fetch-device-wheels.sh where there is an index (Python 3.12
#                            wheels into .whl/), copy .whl/ beside the repository on the GPU machine,
#                            then there: bash bench/device_run.sh   (installs .whl/ into /tmp/site and
#                            runs the image's python3, which must have torch with CUDA)
#   PYTHON=... picks another interpreter.
#
# Time: at most ~9 minutes in all (a 15-minute machine lease less its start): the GPU tests get
# 180 s, the bench what is left of RUN_BUDGET_S (default 520 s) and writes bench.json after each
# section, so a bench cut short still leaves what it measured (and its summary is printed from that).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
RUN_BUDGET_S="${RUN_BUDGET_S:-520}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -5
  export PYTHONPATH=/tmp/site
  PY=python3
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null || true; } 2>&1 | tee "$OUT/gpu.txt"

timeout -k 10 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
echo "GPU tests (exit $?): $(tail -1 "$OUT/gpu_tests.txt")"

left=$(( RUN_BUDGET_S - ($(date +%s) - started) - 15 )); [ "$left" -lt 60 ] && left=60
echo "bench: ${left} s left"
timeout -k 10 "$left" "$PY" bench/bench.py --out "$OUT/bench" --models /tmp/bench-models --runs 3 \
  > "$OUT/bench.log" 2>&1
status=$?
echo "bench exit $status after $(( $(date +%s) - started )) s in all (124: cut short by the time limit)"
if [ -f "$OUT/bench/bench.json" ]; then
  "$PY" bench/bench.py --summary "$OUT/bench" | tee "$OUT/summary.md"
else
  tail -30 "$OUT/bench.log"
fi

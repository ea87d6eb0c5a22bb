#!/usr/bin/env bash
# One run on a GPU machine: the stack, the GPU tests, jobs through the worker, HTTP latency, then the bench (stock
# f5-tts and the worker side by side), everything under $OUT (default /tmp/out), a summary at the end.
#
# Reproduce on any GPU machine (NVIDIA, CUDA; from the repository root):
#   with a package index:    scripts/setup.sh --dev && bash bench/device_run.sh      (uses .venv)
#   without one (offline):   scripts/fetch-device-wheels.sh where there is an index (Python 3.12
#                            wheels into .whl/), copy .whl/ beside the repository on the GPU machine,
#                            then there: bash bench/device_run.sh   (installs .whl/ into /tmp/site and
#                            runs the image's python3, which must have torch with CUDA)
#   PYTHON=... picks another interpreter. RUN_COMMIT=... names the commit where the copy has no .git
#   (say RUN_COMMIT=$(git rev-parse --short HEAD), expanded where the repository is).
#
# $OUT ends with three files, for tools that fetch only a few: gpu.txt (machine, date, commit),
# summary.md, and device_run.tgz holding every section's results and logs.
#
# Order, by value, each section writing its results before the next starts (a run cut short keeps
# what it measured), within RUN_BUDGET_S of wall time (default 470 s, under 8 minutes; each section stops at its own
# limit or at what is left of the budget, whichever comes first):
#   1. the stack: python, torch, CUDA, Triton against the image's pins (bench/stack.py -> stack.json;
#      the summary says when this is not the pinned stack);
#   2. the GPU tests (tests/test_gpu.py: full-width capture-switch-recapture, the demotion tests, the
#      graphed path against stock, varlen and fused kernels), 150 s at most;
#   3. what setting a call aside between two steps costs on one bucket's graph (bench/set_aside.py,
#      full size), 45 s at most;
#   4. jobs through the whole worker at ready and after its fast path switched, then one job of
#      10,000 characters (bench/worker_jobs.py: every job must succeed; the chapter's seconds say
#      how long a text fits the default 600 s job timeout), 210 s at most;
#   5. what word alignment costs per minute of audio (bench/alignment.py: Whisper-turbo-sized random
#      weights), 40 s at most;
#   6. time to first and last byte over HTTP beside the queue face's first audio
#      (bench/http_latency.py, full size), 75 s at most; skipped, and said so, without PyAV;
#   7. the bench figures (stock f5-tts side by side), with what time is left.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
RUN_BUDGET_S="${RUN_BUDGET_S:-470}"
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
left() { echo $(( RUN_BUDGET_S - ($(date +%s) - started) )); }
# A section's time limit: its own cap, or what is left of the run's budget (10 s at least, so a
# section cut short still says why), so the sections together stay inside RUN_BUDGET_S.
cap() { local l; l=$(( $(left) - 15 )); [ "$l" -lt 10 ] && l=10; echo $(( $1 < l ? $1 : l )); }

# On any exit: every result but the two short reports into one archive.
pack() {
  (cd "$OUT" && find . -type f ! -name gpu.txt ! -name summary.md ! -name device_run.tgz -print0 \
    | tar czf device_run.tgz --null -T - --remove-files)
}
trap pack EXIT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: ${RUN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"; } 2>&1 | tee "$OUT/gpu.txt"
"$PY" bench/stack.py "$OUT/stack.json" > /dev/null 2>&1
stack_note=$("$PY" -c "import json; print(json.load(open('$OUT/stack.json'))['note'])" 2>/dev/null || echo "stack unknown")
echo "stack: $stack_note" | tee -a "$OUT/gpu.txt"

timeout -k 10 "$(cap 150)" "$PY" -m pytest -q -p no:cacheprovider -rA tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
echo "GPU tests (exit $?): $(tail -1 "$OUT/gpu_tests.txt")"

timeout -k 10 "$(cap 45)" "$PY" bench/set_aside.py --out "$OUT/set_aside.json" > "$OUT/set_aside.log" 2>&1
echo "set aside (exit $?): $(tail -1 "$OUT/set_aside.log")"

timeout -k 10 "$(cap 210)" "$PY" bench/worker_jobs.py --models /tmp/bench-models --out "$OUT/worker_jobs.json" --jobs 8 \
  --chapter 10000 > "$OUT/worker_jobs.log" 2>&1
echo "worker jobs (exit $?; 1: a job failed): $(tail -1 "$OUT/worker_jobs.log")"

timeout -k 10 "$(cap 40)" "$PY" bench/alignment.py --out "$OUT/alignment.json" > "$OUT/alignment.log" 2>&1
echo "word alignment (exit $?): $(tail -1 "$OUT/alignment.log")"
# The HTTP face imports PyAV (its compressed formats); an offline image may lack it, and the
# section would spend its time failing at import.
if "$PY" -c "import av" 2>/dev/null; then
  timeout -k 10 "$(cap 75)" "$PY" bench/http_latency.py --full --runs 3 --models /tmp/bench-models/http \
    --out "$OUT/http_latency.json" > "$OUT/http_latency.log" 2>&1
  echo "HTTP latency (exit $?): $(tail -1 "$OUT/http_latency.log")"
else
  echo "HTTP latency: skipped, no PyAV (av) for $PY" | tee "$OUT/http_latency.log"
fi

budget=$(( $(left) - 15 )); [ "$budget" -lt 30 ] && budget=30
echo "bench: ${budget} s left"
timeout -k 10 "$budget" "$PY" bench/bench.py --out "$OUT/bench" --models /tmp/bench-models/bench --runs 3 \
  > "$OUT/bench.log" 2>&1
status=$?
echo "bench exit $status after $(( $(date +%s) - started )) s in all (124: cut short by the time limit)"
{ echo "Stack: $stack_note"; echo
  if [ -f "$OUT/bench/bench.json" ]; then "$PY" bench/bench.py --summary "$OUT/bench"; else tail -30 "$OUT/bench.log"; fi
} | tee "$OUT/summary.md"

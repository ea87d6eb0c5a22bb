#!/usr/bin/env bash
# One run on a GPU machine: install the wheels in .whl/, run the GPU tests, run the bench.
#   scripts/fetch-device-wheels.sh (where there is a package index), copy .whl/ beside the repository
#   on the GPU machine, then there: bash bench/device_run.sh   (results under $OUT, default /tmp/out)
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 400 python3 bench/bench.py --out "$OUT/bench" --models /tmp/bench-models 2>&1 | tail -30 | tee "$OUT/bench_tail.txt"

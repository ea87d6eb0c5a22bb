#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks (Python 3.12, x86-64), into .whl/ for the device tool's
# carry: f5-tts's inference dependencies (../shared/device/fetch-wheels.sh) plus what the worker
# and its tests import there (runpod, boto3, pydantic, pytest). Packages the image already has
# (numpy, pyyaml, requests, ...) are left out so they are not shadowed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.whl
shared="${SHARED_DIR:-../shared}/device/fetch-wheels.sh"
bash "$shared" "$dir" >/dev/null
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" runpod==1.12.0 boto3==1.44.8 pydantic==2.14.4
python3 -m pip download -q --no-deps -d "$dir" pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
(cd "$dir" && rm -f numpy-* pyyaml-* PyYAML-* typing_extensions-* packaging-* filelock-* fsspec-* \
  requests-* urllib3-* certifi-* idna-* charset_normalizer-*)
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
du -sh "$dir"

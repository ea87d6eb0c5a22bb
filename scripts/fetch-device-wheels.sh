#!/usr/bin/env bash
# Wheels for a GPU machine without a package index (Python 3.12, x86-64), into .whl/, to copy there
# beside the repository: bench/offline-wheels.txt (f5-tts's inference dependencies) plus what the
# worker and its tests import (runpod, boto3, pydantic, pytest). Packages such an image already has
# (numpy, pyyaml, requests, ...) are left out so they are not shadowed. Then, on that machine:
# bash bench/device_run.sh. A GPU machine with a package index needs none of this: scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.whl
mkdir -p "$dir"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
grep -v '^#' bench/offline-wheels.txt | grep -v '^$' | while read -r spec; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$spec" 2>/dev/null \
  || python3 -m pip wheel -q --no-deps -w "$dir" "$spec"   # sdist only (encodec): build a pure wheel
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" runpod==1.12.0 boto3==1.44.8 pydantic==2.14.4
python3 -m pip download -q --no-deps -d "$dir" pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
(cd "$dir" && rm -f numpy-* pyyaml-* PyYAML-* typing_extensions-* packaging-* filelock-* fsspec-* \
  requests-* urllib3-* certifi-* idna-* charset_normalizer-*)
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
du -sh "$dir"

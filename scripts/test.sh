#!/usr/bin/env bash
# Sets up everything the tests need (pinned venv, dev tools) and runs the whole suite.
# No GPU, no model hub: tests build tiny random models, start SeaweedFS over HTTPS on 127.0.0.1
# and runpod's own local API server themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv}"
scripts/setup.sh --dev
# espeak-ng speaks real words for tests/test_real_speech.py (Debian's package; root, as CI runs).
if ! command -v espeak-ng >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) >/dev/null
fi
export HF_HUB_OFFLINE=1
"$VENV/bin/ruff" check --quiet .  # ruff.toml: unused names, likely bugs, functions too complex
exec "$VENV/bin/python" -m pytest "$@"

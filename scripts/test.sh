#!/usr/bin/env bash
# Set up and run the test suite (tiny random models, plus SmolLM2 end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

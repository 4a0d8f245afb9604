#!/usr/bin/env bash
# Batched decoding on an NVIDIA GPU through onnxruntime's CUDA provider, KV on the GPU: the exit-trained
# code model compiled for target `cuda` (fp16) twice, full (`--exits none`) and exit 3 with a 512-token
# shortlist (the CPU's choice for batches), then bench/batch.py's aggregate tok/s at batch 1, 8 and 32,
# full mode and early exit at ε = 0.9, two rounds, 128 new tokens a sequence, with the held-out agreement.
# Sized for one device call of under ten minutes on an H100 (compiles on the device's CPU: about a minute).
# Needs onnxruntime-gpu there (the CUDA provider); not yet run on a GPU: the batched KV binding by rows of a
# device buffer is marked NOT VERIFIED in eec/runtime/kv.py until it is.
# usage: bench/gpu_batch.sh CODE_LM_DIR WORK_DIR   (CODE_LM_DIR: examples/code_lm/train.py's output)
set -euo pipefail
src=${1:?code model directory}; work=${2:?work directory}
mkdir -p "$work"
eec() { python3 -m eec "$@"; }
python3 -c "import onnxruntime as o, sys; sys.exit('onnxruntime has no CUDA provider here: install onnxruntime-gpu') \
    if 'CUDAExecutionProvider' not in o.get_available_providers() else None"
art="$work/code-cuda-e3.eec"; full="$work/code-cuda-full.eec"
[ -d "$art" ] || eec compile "$src" -o "$art" --target cuda --exits 3 --shortlist 512 \
    --prompts examples/code_lm/calibration_prompts.txt --calibration-tokens 128
[ -d "$full" ] || eec compile "$src" -o "$full" --target cuda --exits none --no-calibrate
python3 bench/batch.py "$full" "$art" --eps 0.9 --prompts examples/code_lm/heldout_prompts.txt \
    --batches 1,8,32 --rounds 2 --tokens 128

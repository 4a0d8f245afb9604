#!/usr/bin/env bash
# The exit-trained code model on an NVIDIA GPU through onnxruntime's CUDA provider (onnxruntime-gpu),
# in one run on one machine: compile for target `cuda` (fp16, KV kept on the GPU) with exit 3 and a
# 512-token shortlist (the CPU showcase's choice), calibrate; `eec profile` (full mode against early
# exits at several ε, interleaved, 128 new tokens a held-out prompt, medians); `eec targets measure`;
# then transformers eager fp16 on the same GPU, the same prompts and token count.
# usage: bench/gpu_code_model.sh CODE_LM_DIR WORK_DIR   (CODE_LM_DIR: examples/code_lm/train.py's output)
set -euo pipefail
src=${1:?code model directory}; work=${2:?work directory}
mkdir -p "$work"
eec() { python3 -m eec "$@"; }
art="$work/code-cuda-3.eec"; full="$work/code-cuda-full.eec"
[ -d "$art" ] || eec compile "$src" -o "$art" --target cuda --exits 3 --shortlist 512 \
    --prompts examples/code_lm/calibration_prompts.txt --calibration-tokens 128
[ -d "$full" ] || eec compile "$src" -o "$full" --target cuda --exits none --no-calibrate
eec profile "$art" --eps 0.8,0.9,0.95 --prompts examples/code_lm/heldout_prompts.txt --tokens 128 \
    --rounds 5 --json "$work/profile.json"
eec targets measure "$full" "$art" -o "$work/latency.json"
python3 - "$src" <<'PY'
import statistics, sys, time
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
src = sys.argv[1]
tok = Tokenizer.from_file(f"{src}/tokenizer.json")
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).cuda().eval()
prompts = [l.rstrip("\n") for l in open("examples/code_lm/heldout_prompts.txt") if l.strip()]
rates = []
for _ in range(2):  # the first round warms up
    for p in prompts:
        ids = torch.tensor([tok.encode(p).ids], device="cuda")
        with torch.no_grad():
            torch.cuda.synchronize(); start = time.perf_counter()
            model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
            torch.cuda.synchronize(); rates.append(128 / (time.perf_counter() - start))
print(f"transformers eager fp16 on cuda: median {statistics.median(rates[len(prompts):]):.1f} tok/s "
      f"(128 new tokens, {len(prompts)} prompts, second round)")
PY

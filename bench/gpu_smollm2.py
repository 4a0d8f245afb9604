"""SmolLM2-135M-Instruct on an NVIDIA GPU: eec `mode="full"` through onnxruntime's CUDA provider against
transformers eager, both fp16, in one run.

Compiles the GGUF for target `cuda` (fp16, no exits) unless ``--artifact`` is given, then decodes
the same chat prompt for 128 new tokens (end-of-sequence ignored) with each, interleaved, several
rounds; prints medians, their ratio and the weight bandwidth each reaches. Usage, on the GPU machine
(onnxruntime-gpu installed):

    python bench/gpu_smollm2.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work gpu-work
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eec.compiler import compile_model
from eec.runtime import load

PROMPT = "Explain how a refrigerator works, step by step."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--artifact", type=Path, help="an fp16 artifact compiled for target cuda (default: compile one)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact or args.work / "smollm2-cuda-full.eec"
    if not artifact.exists():
        compile_model(args.gguf, artifact, target="cuda", exits=[], calibrate=False)
    model = load(artifact, device="cuda")
    ids = model.encode(PROMPT)
    tokenizer = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float16)
    hf = hf.cuda().eval()
    weight_bytes = 2 * (sum(p.numel() for p in hf.model.layers.parameters()) + hf.lm_head.weight.numel())
    del tokenizer
    prompt = torch.tensor([ids], device="cuda")

    def eec_run() -> float:
        model.generate(ids, mode="full", max_new_tokens=args.tokens, ignore_eos=True)
        return model.stats.tokens_per_s

    def hf_run() -> float:
        with torch.no_grad():
            torch.cuda.synchronize()
            start = time.perf_counter()
            hf.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                        attention_mask=torch.ones_like(prompt))
            torch.cuda.synchronize()
        return args.tokens / (time.perf_counter() - start)

    eec_run(), hf_run()  # warm-up
    rates = {"eec full (onnxruntime CUDA, fp16)": [], "transformers eager (fp16)": []}
    for _ in range(args.rounds):
        rates["eec full (onnxruntime CUDA, fp16)"].append(eec_run())
        rates["transformers eager (fp16)"].append(hf_run())
    medians = {k: statistics.median(v) for k, v in rates.items()}
    for name, rate in medians.items():
        print(f"{name:36s} {rate:8.1f} tok/s   {rate * weight_bytes / 1e9:6.1f} GB/s of weights")
    eec_rate, hf_rate = medians.values()
    print(f"eec full / transformers eager: {eec_rate / hf_rate:.2f}x ({args.rounds} rounds, {args.tokens} new tokens, "
          f"{torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()

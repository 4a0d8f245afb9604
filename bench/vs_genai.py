"""SmolLM2-135M-Instruct, 128 greedy tokens: transformers eager, onnxruntime-genai int4, eec int4 full and
eec int4 early exit at ε = 0.9 with --exits auto, interleaved in one run on one machine.

onnxruntime-genai is a peer here, not a dependency of eec: install it into the
benchmark's environment (`pip install onnxruntime-genai`); its int4 model is
built from the same weights with its own builder (`-p int4 -e cpu`). Usage:

    .venv/bin/python bench/vs_genai.py [--work bench-work] [--model-pt model.pt] [--rounds 3]

``--model-pt`` compiles eec from a checkpoint with trained heads (`eec train`);
without it the exits use the model's own head. The work folder keeps the
built models between runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from full_vs_transformers import smollm2_gguf, time_hf  # noqa: E402

from eec.compiler import compile_model  # noqa: E402
from eec.runtime import load  # noqa: E402
from eec.targets.measure import measure_artifacts  # noqa: E402

PROMPTS = [
    "Explain how a refrigerator works, step by step.",
    "Write a short story about a lighthouse keeper.",
    "What are the main differences between Python lists and tuples?",
]


def hf_dir(work: Path, gguf: Path) -> Path:
    """The GGUF weights dequantized into a plain Hugging Face folder (what genai's builder reads)."""
    out = work / "smollm2-hf"
    if not (out / "config.json").exists():
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = hf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(hf.state_dict())
        plain.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def genai_model(work: Path, hf: Path) -> Path:
    out = work / "genai-int4"
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def time_genai(model, ids: list[int], n: int) -> float:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) - len(ids) == n
    return n / (time.perf_counter() - start)


def time_eec(model, ids: list[int], n: int, **kwargs) -> float:
    start = time.perf_counter()
    result = model.generate(ids, max_new_tokens=n, ignore_eos=True, **kwargs)
    assert len(result.tokens) == n
    return n / (time.perf_counter() - start)


def weight_bytes(artifact: Path, vocab: int, hidden: int) -> int:
    """Bytes of weights a full-mode token reads: the segment files less the fp32 embedding
    table, of which a token reads one row."""
    return sum(f.stat().st_size for f in (artifact / "segments").iterdir()) - vocab * hidden * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--model-pt", type=Path, help="eec checkpoint with trained heads (default: the GGUF, shared heads)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.9)
    args = parser.parse_args()
    import onnxruntime_genai as og

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    work = args.work.absolute()
    work.mkdir(exist_ok=True)
    gguf = smollm2_gguf()
    source = args.model_pt or gguf
    hf_path = hf_dir(work, gguf)
    genai_path = genai_model(work, hf_path)
    cuts, full_art = work / "eec-int4-cuts.eec", work / "eec-int4-full.eec"
    auto_art, profile = work / "eec-int4-auto.eec", work / "profile-int4.json"
    if not cuts.exists():
        # Exits at every candidate --exits auto will choose among (trained heads, else quarter depths):
        # measured beside the one-segment model, the profile covers every range and fits the fixed
        # cost of a segment call.
        print("compiling eec int4 (exits at every candidate) ...", flush=True)
        compile_model(source, cuts, precision="int4", calibrate=False)
    if not full_art.exists():
        print("compiling eec int4 (no exits) ...", flush=True)
        compile_model(source, full_art, exits=[], precision="int4", calibrate=False)
    if not profile.exists():
        profile.write_text(measure_artifacts([cuts, full_art]).to_json())
    if not auto_art.exists():
        print(f"compiling eec int4 --exits auto --eps {args.eps} ...", flush=True)
        compile_model(source, auto_art, exits="auto", precision="int4", placement_eps=args.eps, profile=profile)
    auto = load(auto_art)
    placement = auto.manifest.placement
    print("\n".join(placement["report"]))

    hf = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    genai = og.Model(str(genai_path))
    full = load(full_art)
    prompts = [full.encode(p) for p in PROMPTS]
    rows: dict[str, list[float]] = {"transformers eager fp32": [], "onnxruntime-genai int4": [], "eec int4 full": [],
                                    f"eec int4 early-exit ε={args.eps} (auto)": []}
    time_eec(full, prompts[0], 8, mode="full")
    time_eec(auto, prompts[0], 8, epsilon=args.eps)
    time_genai(genai, prompts[0], 8)
    exits: dict[int, int] = {}
    for r in range(args.rounds):
        for ids in prompts:
            rows["transformers eager fp32"].append(time_hf(hf, torch.tensor([ids]), args.tokens))
            rows["onnxruntime-genai int4"].append(time_genai(genai, ids, args.tokens))
            rows["eec int4 full"].append(time_eec(full, ids, args.tokens, mode="full"))
            rows[f"eec int4 early-exit ε={args.eps} (auto)"].append(time_eec(auto, ids, args.tokens, epsilon=args.eps))
            for layer, count in auto.stats.exits.items():
                exits[layer] = exits.get(layer, 0) + count
        print(f"round {r + 1}: " + ", ".join(f"{k} {statistics.median(v[-len(prompts):]):.1f}" for k, v in rows.items()),
              flush=True)

    genai_med = statistics.median(rows["onnxruntime-genai int4"])
    eager_med = statistics.median(rows["transformers eager fp32"])
    full_med = statistics.median(rows["eec int4 full"])
    spec = full.manifest.model
    gb = weight_bytes(full_art, spec.vocab_size, spec.hidden_size) / 1e9
    print(f"\nSmolLM2-135M-Instruct, {args.tokens} new tokens, {len(prompts)} prompts x {args.rounds} rounds, medians "
          f"(tok/s including the prompt); eec int4 reads {gb * 1e3:.0f} MB of weights per token")
    print(f"{'':42} {'tok/s':>7} {'vs genai int4':>14} {'vs eager':>9} {'vs eec full':>12}")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"{name:42} {med:7.1f} {med / genai_med:13.2f}x {med / eager_med:8.2f}x {med / full_med:11.2f}x")
    print(f"eec int4 full reads {gb * full_med:.1f} GB/s of weights")
    auto_med = statistics.median(rows[f"eec int4 early-exit ε={args.eps} (auto)"])
    print(f"placement: exits {placement['exits'] or 'none'}, predicted {placement['predicted_speedup']:.2f}x, "
          f"measured {auto_med / full_med:.2f}x against eec int4 full; exits taken {dict(sorted(exits.items()))}")


if __name__ == "__main__":
    main()

"""Held-out fidelity of ε-calibrated early exit on SmolLM2-135M-Instruct.

For each artifact given (compiled and calibrated on eec's calibration prompts),
decodes the held-out prompts (bench/heldout_prompts.txt) with early exit at each
ε and rule and reports: the share of tokens that exit early, the mean exit
depth, the teacher-forced agreement with the artifact's full model (the
greedy token, at the same prefix, of the transformers model the artifact was
compiled from: the fine-tuned one for a joint-mode checkpoint) and decode
speed against the artifact's own full mode, in one run. Usage:

    .venv/bin/python bench/calibration_fidelity.py ARTIFACT [ARTIFACT ...] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from eec.compiler.frontends import load_source
from eec.runtime import load

HERE = Path(__file__).parent


def heldout_prompts() -> list[str]:
    lines = (HERE / "heldout_prompts.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def reference_model(model):
    """The transformers model the artifact was compiled from (its `source`)."""
    return load_source(model.manifest.model.source).model


@torch.no_grad()
def teacher_forced_agreement(hf, prompt: list[int], tokens: list[int]) -> list[bool]:
    """Does each generated token equal the full model's greedy token at the same prefix?"""
    logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    return [int(a) == t for a, t in zip(logits.argmax(-1), tokens)]


def run(model, hf, prompts, tokens: int, **kwargs) -> dict:
    agree, exits, speeds = [], [], []
    for text in prompts:
        ids = model.encode(text)
        result = model.generate(ids, max_new_tokens=tokens, **kwargs)
        agree += teacher_forced_agreement(hf, ids, result.tokens)[1:]  # the first token comes from the full prompt pass
        exits += result.exits[1:]
        speeds.append(model.stats.tokens_per_s)
    n = model.num_layers
    return {
        "exit_rate": sum(e < n for e in exits) / len(exits),
        "depth": sum(exits) / len(exits),
        "agreement": sum(agree) / len(agree),
        "tok_s": statistics.median(speeds),
        "exits": {layer: exits.count(layer) for layer in sorted(set(exits))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--eps", default="0.8,0.9,0.95")
    args = parser.parse_args()
    prompts = heldout_prompts()
    epsilons = [float(e) for e in args.eps.split(",")]
    print(f"{len(prompts)} held-out prompts, {args.tokens} tokens each, fp32")
    print("| artifact | heads | rule | ε | exit rate | mean depth | agreement | ≥ ε − 0.02 | tok/s vs full | exits per layer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.artifacts:
        model = load(path)
        hf = reference_model(model)
        kinds = sorted({s.exit.kind for s in model.manifest.segments[:-1]})
        full = run(model, hf, prompts, args.tokens, mode="full")
        for eps in epsilons:
            for rule in ("risk", "valade"):
                r = run(model, hf, prompts, args.tokens, epsilon=eps, rule=rule)
                ok = "yes" if r["agreement"] >= eps - 0.02 else "NO"
                print(f"| {path.name} ({model.manifest.calibration.metric}) | {'/'.join(kinds)} | {rule} | {eps} | "
                      f"{r['exit_rate']:.3f} | {r['depth']:.1f} | {r['agreement']:.3f} | {ok} | "
                      f"{r['tok_s'] / full['tok_s']:.2f}x | {r['exits']} |", flush=True)


if __name__ == "__main__":
    main()

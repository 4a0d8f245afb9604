"""Artifact bytes against the model's distinct weights, and resident memory after load (SmolLM2-135M).

For each precision (fp32 and int4 for the CPU, fp16 for a Jetson's TensorRT) it compiles, with every
optional graph written (heads fused into their segments, the verify graph):

- ``trained``: model.pt with trained heads at 8, 16, 24 (a quick training: sizes do not depend on quality),
- ``own head``: the GGUF with exits at 8, 16, 24 using the model's own final norm and LM head,
- ``one segment``: the GGUF with no exits,

and reports each artifact's bytes against the distinct weights at that precision (the one-segment
artifact's weights plus each trained head's graph weights), the bytes the graphs refer to (what each
graph storing its own weights would take), and the resident memory of a process after ``load`` and
after decoding in full and early-exit mode, each in its own process.

    .venv/bin/python bench/sizes.py --work bench-work/sizes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.full_vs_transformers import smollm2_gguf  # noqa: E402

EXITS = [8, 16, 24]
BUILDS = {"fp32": ("cpu", "fp32"), "int4": ("cpu", "int4"), "fp16-jetson": ("jetson-orin-agx", "fp16")}


def graph_bytes(graph: Path) -> int:
    """Bytes of a graph's initializers held outside it: what it would store alone."""
    model = onnx.load(graph, load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        total += int(info.get("length", 0))
    return total


def artifact_bytes(art: Path) -> int:
    return sum(p.stat().st_size for p in art.rglob("*") if p.is_file())


MEMORY = r"""
import json, math, sys
from eec.runtime import load
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024
base = rss()
model = load(sys.argv[1])
after_load = rss()
model.generate([1, 2, 3, 4], mode='full', max_new_tokens=4)
full = rss()
exits = None
if model.exits:
    model.generate([1, 2, 3, 4], thresholds=0.5, max_new_tokens=4)
    exits = rss()
print(json.dumps({'load': after_load - base, 'full': full - base, 'early_exit': exits and exits - base}))
"""


def memory(art: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEMORY, str(art)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    from eec.compiler import compile_model
    from eec.train import TrainConfig, train

    gguf = smollm2_gguf()
    ckpt = work / "model.pt"
    if not ckpt.exists():
        print("training quick heads", flush=True)
        train(gguf, ckpt, TrainConfig(exits=EXITS, epochs=1, max_new_tokens=16, max_tokens=2000))
    rows = []
    for name, (target, precision) in BUILDS.items():
        arts = {}
        for kind, source, exits in (("one segment", gguf, []), ("own head", gguf, EXITS), ("trained", ckpt, EXITS)):
            art = arts[kind] = work / f"{name}-{kind.replace(' ', '-')}.eec"
            if not art.exists():
                print(f"compiling {kind} {name}", flush=True)
                compile_model(source, art, exits=exits, target=target, precision=precision, calibrate=False,
                              fuse_heads="on", speculative="on" if exits else "off")
        heads = sum(graph_bytes(g) for g in (arts["trained"] / "graphs").glob("exit*.onnx"))
        distinct = (arts["one segment"] / "graphs" / "weights.data").stat().st_size + heads
        for kind, art in arts.items():
            referenced = sum(graph_bytes(g) for g in (art / "graphs").glob("*.onnx"))
            size = artifact_bytes(art)
            base = distinct if kind == "trained" else artifact_bytes(arts["one segment"])
            row = dict(build=name, kind=kind, mb=size / 1e6, referenced_mb=referenced / 1e6,
                       ratio=size / base, against="distinct weights" if kind == "trained" else "one segment",
                       **{f"rss_{k}_mb": v for k, v in memory(art).items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| build | artifact | MB | x (against) | graphs alone would store, MB | RSS after load / full / early exit, MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ee = f"{r['rss_early_exit_mb']:.0f}" if r["rss_early_exit_mb"] is not None else "-"
        print(f"| {r['build']} | {r['kind']} | {r['mb']:.1f} | {r['ratio']:.3f} ({r['against']}) | "
              f"{r['referenced_mb']:.1f} | {r['rss_load_mb']:.0f} / {r['rss_full_mb']:.0f} / {ee} |")


if __name__ == "__main__":
    main()

"""Early-exit classifiers against the whole network: images/s at batch 1 and 64, accuracy and agreement.

    .venv/bin/python examples/digits/train.py -o digits
    .venv/bin/python bench/classifier.py digits --net branchy
    .venv/bin/python bench/classifier.py digits --net sdn

Peers, each in its own process, one after another, on the same test set
(``DIR/test.npz``), with onnxruntime's and PyTorch's default thread counts
(every core):
- eec early exit at ε = 0.95 and 0.99 (the artifact's default meaning of ε:
  accuracy against the calibration labels, one threshold for every exit,
  δ 0.1) and eec full, from an
  artifact compiled from ``DIR/NET.pt`` with ``--data DIR/calib.npz`` and
  ``--exits auto`` (``--exits all`` keeps every head);
- the same trained network without its exits, exported whole with
  ``torch.onnx.export`` and run by onnxruntime (the peer a user would pick);
- PyTorch eager on that network.

Throughput is the median of ``--rounds`` passes over the test set: at batch 1
one image a call, at batch 64 the set in batches of 64. Agreement is with the
whole network's labels; accuracy with the test labels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BATCHES = (1, 64)


def timed(run, x: np.ndarray, batch: int, rounds: int) -> tuple[float, np.ndarray]:
    """Median images/s over ``rounds`` passes, and the labels of the last."""
    rates = []
    for _ in range(rounds + 1):  # the first pass warms up
        labels = []
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            labels.append(run(x[i:i + batch]))
        rates.append(len(x) / (time.perf_counter() - start))
    return float(np.median(rates[1:])), np.concatenate(labels)


def peer(args) -> None:
    """One peer in this process: print its images/s per batch size and its labels as JSON."""
    with np.load(args.dir / "test.npz") as z:
        x = z["x"]
    extra = {}
    if args.peer.startswith("eec"):
        from eec.runtime import load

        model = load(args.dir / f"{args.net}.eec")
        options = {"mode": "full"} if args.peer == "eec-full" else {"epsilon": float(args.peer.split("=")[1])}

        def run(batch):
            return model.classify(batch, **options).labels

        exits = model.classify(x, **options).exits
        extra["exits"] = {int(k): int((exits == k).sum()) for k in np.unique(exits)}
    elif args.peer == "onnxruntime-whole":
        import onnxruntime as ort

        session = ort.InferenceSession(str(args.dir / f"{args.net}-whole.onnx"), providers=["CPUExecutionProvider"])

        def run(batch):
            return session.run(None, {"x": batch})[0].argmax(-1)
    else:  # pytorch
        import torch

        net = whole_network(args.dir, args.net)

        def run(batch):
            with torch.inference_mode():
                return net(torch.from_numpy(batch)).argmax(-1).numpy()

    result = {}
    for batch in BATCHES:
        rate, labels = timed(run, x, batch, args.rounds)
        result[batch] = rate
    print(json.dumps({"rates": result, "labels": labels.tolist(), **extra}))


def whole_network(folder: Path, name: str):
    import torch

    sys.path.insert(0, str(HERE.parent / "examples" / "digits"))
    from nets import NETS, Whole

    net = NETS[name]()
    net.load_state_dict(torch.load(folder / f"{name}.state.pt", weights_only=True))
    return Whole(net.eval()).eval()


def prepare(folder: Path, name: str, exits: str, overwrite: bool) -> None:
    """The eec artifact and the whole-network ONNX graph, unless they exist."""
    art, whole = folder / f"{name}.eec", folder / f"{name}-whole.onnx"
    if overwrite or not art.exists():
        from eec.compiler.branched_pipeline import compile_branched

        chosen = None if exits == "all" else "auto" if exits == "auto" else [int(k) for k in exits.split(",")]
        manifest = compile_branched(folder / f"{name}.pt", art, data=folder / "calib.npz", exits=chosen,
                                    overwrite=True)
        for line in (manifest.placement or {}).get("report", []):
            print(line)
    if overwrite or not whole.exists():
        import torch
        from torch.export import Dim

        with np.load(folder / "test.npz") as z:
            example = torch.from_numpy(z["x"][:4])
        program = torch.onnx.export(whole_network(folder, name), (example,), input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=({0: Dim("batch")},), dynamo=True, verbose=False)
        program.optimize()
        program.save(str(whole))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="the folder examples/digits/train.py wrote")
    ap.add_argument("--net", default="branchy")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--exits", default="auto", help="the artifact's exits: auto (placed at ε 0.99 by latency measured "
                    "here), all, or stage numbers")
    ap.add_argument("--overwrite", action="store_true", help="recompile the artifact and re-export the whole network")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer(args)
    prepare(args.dir, args.net, args.exits, args.overwrite)
    with np.load(args.dir / "test.npz") as z:
        y = z["y"]
    peers = ["eec-eps=0.95", "eec-eps=0.99", "eec-full", "onnxruntime-whole", "pytorch"]
    results = {}
    for name in peers:
        done = subprocess.run([sys.executable, __file__, str(args.dir), "--net", args.net, "--rounds", str(args.rounds),
                               "--peer", name], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} failed: {done.stderr.strip()[-2000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = np.array(results["onnxruntime-whole"]["labels"])
    base = results["onnxruntime-whole"]["rates"]
    from eec.runtime import load

    model = load(args.dir / f"{args.net}.eec")
    print(f"{args.net}: {len(y)} held-out digits, median of {args.rounds} passes; the artifact's exits follow stages "
          f"{model.exits} (metric {model.manifest.calibration.metric})")
    print("| peer | batch 1 images/s | batch 64 images/s | vs onnxruntime whole (1 / 64) | accuracy | "
          "disagrees with the whole network | exits (stage: samples) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        labels = np.array(r["labels"])
        rates = r["rates"]
        print(f"| {name} | {rates['1']:.0f} | {rates['64']:.0f} | {rates['1'] / base['1']:.2f}x / "
              f"{rates['64'] / base['64']:.2f}x | {(labels == y).mean():.4f} | {(labels != reference).mean():.4f} | "
              f"{r.get('exits', '')} |")


if __name__ == "__main__":
    main()

"""Early-exit text classifiers against the optimized whole model: texts/s at batch 1 and 32, held-out accuracy.

    .venv/bin/python examples/stdlib_bert/train.py -o stdlib-bert --minutes 18
    for r in deebert pabee fastbert berxit; do
        eec train stdlib-bert/hf --recipe $r --exits 1,2,3,4,5 --data stdlib-bert/train.jsonl --epochs 2 -o stdlib-bert/$r.pt
    done
    .venv/bin/python bench/text_classifier.py stdlib-bert --recipes deebert,pabee,fastbert,berxit

Peers, each in its own process, one after another, every core, fp32, on the
same held-out texts (``DIR/test.jsonl``), each tokenizing its own input:
- eec early exit at ε = 0.95 and 0.99 (risk rule, δ 0.1) and eec full for each
  recipe's checkpoint (``DIR/RECIPE.pt``, compiled with ``--data DIR/calib.jsonl``),
  ε of each of ``--criteria``: agreement with full mode, and accuracy against
  the calibration labels (``criterion="accuracy"``), thresholds by each of
  ``--rules`` (``risk``: one per exit, each exit's takers; ``joint``: one for
  every exit, certified over all texts);
- the base model (``DIR/hf``) exported whole with ``torch.onnx.export`` and
  optimized by ``onnxruntime.transformers.optimizer`` (fused attention and
  layer norms: the fastest path a user has today), fed by the same
  ``tokenizers`` tokenizer;
- PyTorch eager on the base model, with its transformers tokenizer.

Throughput is the median of ``--rounds`` passes: at batch 1 over the first
``--single`` texts one at a time, at batch 32 over the whole set in its
order, 32 texts a call (each peer pads a call to its longest text). With
``--repeat N`` every peer's process runs N times, the peers alternated, and
the table takes each peer's median run: this machine has slow spells of tens
of seconds (30% at batch 1) that one run a peer cannot tell from the peer.
``--paired N`` goes further: every peer's process starts at once and waits
idle while another runs, and N rounds take one pass of each peer in turn
(batch 1, then 32); each ratio is the median of the rounds' ratios to the
onnxruntime pass made seconds before or after, so a slow spell lands on both
sides of a ratio instead of on one peer's runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 32)


def texts_and_labels(folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    config = json.loads((folder / "hf" / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    rows = [json.loads(line) for line in open(folder / "test.jsonl", encoding="utf-8")]
    return [r["text"] for r in rows], np.array([names.index(r["label"]) for r in rows]), names


def one_pass(run, texts: list[str], batch: int, single: int) -> tuple[float, np.ndarray]:
    """Texts a second and labels of one pass: at batch 1 over the first ``single`` texts, else all of them."""
    items = texts[:single] if batch == 1 else texts
    start = time.perf_counter()
    labels = [run(items[i:i + batch]) for i in range(0, len(items), batch)]
    return len(items) / (time.perf_counter() - start), np.concatenate(labels)


def timed(run, texts: list[str], batch: int, rounds: int, single: int) -> tuple[float, np.ndarray]:
    passes = [one_pass(run, texts, batch, single) for _ in range(rounds + 1)]  # the first pass warms up
    return float(np.median([rate for rate, _ in passes[1:]])), passes[-1][1]


def peer(args) -> None:
    texts, _, _ = texts_and_labels(args.dir)
    extra = {}
    if args.peer.startswith("eec"):
        from eec.runtime import load

        _, recipe, setting, *how = args.peer.split(":")
        model = load(args.dir / f"{recipe}.eec")
        options = {"mode": "full"} if setting == "full" else {"epsilon": float(setting), "criterion": how[0],
                                                              "rule": how[1]}

        def run(batch):
            return model.classify(batch, batch_size=len(batch), **options).labels

        exits = model.classify(texts, **options).exits
        extra["exits"] = {int(k): int((exits == k).sum()) for k in np.unique(exits)}
    elif args.peer == "onnxruntime-optimized":
        import onnxruntime as ort
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.dir / "hf" / "tokenizer.json"))
        tok.enable_truncation(128)
        config = json.loads((args.dir / "hf" / "config.json").read_text())
        tok.enable_padding(pad_id=config.get("pad_token_id") or 0)
        session = ort.InferenceSession(str(args.dir / "whole-optimized.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(batch):
            enc = tok.encode_batch_fast(batch)  # as eec's runtime: no character offsets
            feeds = {"input_ids": np.array([e.ids for e in enc], np.int64),
                     "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
            if "token_type_ids" in names:
                feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
            return session.run(None, feeds)[0].argmax(-1)
    else:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(args.dir / "hf").eval()
        tok = AutoTokenizer.from_pretrained(args.dir / "hf")

        def run(batch):
            with torch.inference_mode():
                return model(**tok(batch, padding=True, truncation=True, max_length=128,
                                   return_tensors="pt")).logits.argmax(-1).numpy()

    if args.serve:  # one pass a request, told on stdin by the parent (`paired`); idle in between
        labels = np.concatenate([run(texts[i:i + 32]) for i in range(0, len(texts), 32)])
        print(json.dumps({"labels": labels.tolist(), **extra}), flush=True)
        for line in sys.stdin:
            print(json.dumps(one_pass(run, texts, int(line), args.single)[0]), flush=True)
        return
    rates, labels = {}, None
    for batch in BATCHES:
        rates[batch], got = timed(run, texts, batch, args.rounds, args.single)
        labels = got if batch != 1 else labels
    print(json.dumps({"rates": rates, "labels": labels.tolist(), **extra}))


def paired(args, peers: list[str]) -> dict[str, dict]:
    """Every peer in a process of its own, all started at once and idle but one: a pass of each peer in
    turn, batch by batch, round after round (the first peer of a round rotating), so that passes
    compared with each other are seconds apart, not minutes. Each peer's rate is the median of its
    passes, and its ratio to the first peer the median of the rounds' ratios."""
    workers = {name: subprocess.Popen([sys.executable, __file__, str(args.dir), "--single", str(args.single),
                                       "--peer", name, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True) for name in peers}
    results = {}
    for name, w in workers.items():
        line = w.stdout.readline()
        if not line:
            sys.exit(f"{name} failed to start")
        results[name] = dict(json.loads(line), passes={str(b): [] for b in BATCHES})
    for r in range(args.paired + 1):  # the first round warms up
        for batch in BATCHES:
            order = peers[r % len(peers):] + peers[: r % len(peers)]
            for name in order:
                time.sleep(0.1)  # the last peer's thread pool stops spinning
                workers[name].stdin.write(f"{batch}\n")
                workers[name].stdin.flush()
                rate = json.loads(workers[name].stdout.readline())
                if r:
                    results[name]["passes"][str(batch)].append(rate)
        print(f"round {r}: " + ", ".join(f"{n} {results[n]['passes']['1'][-1]:.0f}" for n in peers if r),
              file=sys.stderr, flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    base = results[peers[0]]["passes"]
    for name, res in results.items():
        res["rates"] = {b: float(np.median(v)) for b, v in res["passes"].items()}
        res["ratios"] = {b: float(np.median(np.array(v) / np.array(base[b]))) for b, v in res["passes"].items()}
    return results


def prepare(folder: Path, recipes: list[str]) -> None:
    """The optimized whole model and each recipe's artifact, unless they exist. The whole model first: the
    optimizer opens an onnxruntime session of its own, which eec's process-wide thread pool would refuse."""
    if not (folder / "whole-optimized.onnx").exists():
        import torch
        from onnxruntime.transformers.optimizer import optimize_model
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(folder / "hf", attn_implementation="eager").eval()
        ids = torch.randint(5, 100, (2, 16))
        mask = torch.ones_like(ids)
        raw = folder / "whole.onnx"
        with torch.no_grad():
            # the TorchScript exporter: its graphs are the ones onnxruntime's optimizer fuses attention in
            torch.onnx.export(model, (ids, mask), str(raw), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamo=False, opset_version=17,
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
        c = model.config
        optimized = optimize_model(str(raw), model_type="bert", num_heads=c.num_attention_heads, hidden_size=c.hidden_size)
        print("optimized whole model:", optimized.get_fused_operator_statistics())
        optimized.save_model_to_file(str(folder / "whole-optimized.onnx"))
        raw.unlink()
    for recipe in recipes:
        if not (folder / f"{recipe}.eec").exists():
            from eec.compiler.encoder_pipeline import compile_encoder

            compile_encoder(folder / f"{recipe}.pt", folder / f"{recipe}.eec", data=folder / "calib.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--recipes", default="deebert,pabee,fastbert,berxit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single", type=int, default=300, help="texts timed one at a time")
    ap.add_argument("--criteria", default="agreement,accuracy", help="what ε holds exits to, comma-separated")
    ap.add_argument("--rules", default="risk,joint", help="threshold rules, comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every peer, alternated; the median is kept")
    ap.add_argument("--paired", type=int, default=0,
                    help="rounds of one pass a peer, the peers' processes running side by side (see `paired`)")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer(args)
    recipes = [r for r in args.recipes.split(",") if r]
    prepare(args.dir, recipes)
    _, y, _ = texts_and_labels(args.dir)
    peers = ["onnxruntime-optimized", "pytorch"]
    for r in recipes:
        peers += [f"eec:{r}:full"] + [f"eec:{r}:{e}:{c}:{rule}" for rule in args.rules.split(",")
                                      for c in args.criteria.split(",") for e in ("0.95", "0.99")]
    if args.paired:
        report(paired(args, peers), y, f"{len(y)} held-out functions; batch 1 over the first {args.single}; "
               f"{args.paired} rounds of one pass a peer, peers alternated; medians of rates and of ratios")
        return
    runs = {name: [] for name in peers}
    for _ in range(args.repeat):
        for name in peers:
            done = subprocess.run([sys.executable, __file__, str(args.dir), "--rounds", str(args.rounds), "--single",
                                   str(args.single), "--peer", name], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed: {done.stderr.strip()[-2000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name}: {runs[name][-1]['rates']}", file=sys.stderr, flush=True)
    results = {}
    for name, got in runs.items():
        results[name] = dict(got[0], rates={b: float(np.median([r["rates"][b] for r in got])) for b in got[0]["rates"]})
    report(results, y, f"{len(y)} held-out functions; batch 1 over the first {args.single}; median of {args.rounds} "
           f"passes, median of {args.repeat} runs a peer")


def report(results: dict[str, dict], y: np.ndarray, title: str) -> None:
    base = results["onnxruntime-optimized"]["rates"]
    print(title)
    print("| peer | batch 1 texts/s | batch 32 texts/s | vs onnxruntime optimized (1 / 32) | accuracy | "
          "agrees with its full mode | exits (layer: texts) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        labels, rates = np.array(r["labels"]), r["rates"]
        # ε's own measure on held-out texts: the share of answers equal to the same artifact's full mode
        full = results.get(":".join(name.split(":")[:2] + ["full"])) if name.startswith("eec") else None
        agrees = f"{(labels == np.array(full['labels'])).mean():.4f}" if full else ""
        ratios = r.get("ratios") or {b: rates[b] / base[b] for b in rates}
        print(f"| {name} | {rates['1']:.0f} | {rates['32']:.0f} | {ratios['1']:.2f}x / {ratios['32']:.2f}x | {(labels == y).mean():.4f} | {agrees} | {r.get('exits', '')} |")


if __name__ == "__main__":
    main()

"""A small BERT, trained from scratch, that tells which standard-library package a function comes from.

The data ships with Python: every function (with its docstring) in twelve
packages of the standard library this Python runs from (asyncio, email,
tkinter, ...). The label is the package; whole modules are held out (a
module whose path hashes to 0 mod 5 is for testing, 1 mod 5 for
calibration), so the test functions come from files the model never saw.

Writes into OUT:
- ``train.jsonl``, ``calib.jsonl``, ``test.jsonl``: ``{"text", "label"}`` a line;
- ``hf/``: the trained ``BertForSequenceClassification`` with its WordPiece
  tokenizer, a Hugging Face directory that ``eec train`` and ``eec compile``
  take (the exits come after, by any recipe: README.md).

    .venv/bin/python examples/stdlib_bert/train.py -o stdlib-bert --minutes 20
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch

PACKAGES = ("asyncio", "distutils", "email", "http", "idlelib", "importlib", "lib2to3", "logging",
            "multiprocessing", "tkinter", "unittest", "xml")
MAX_CHARS = 1200  # a function's first characters: its signature, docstring and first lines
MAX_LENGTH = 128  # tokens


def functions() -> dict[str, list[dict]]:
    """Every function of the packages, split by module into train, calib and test."""
    root = Path(sysconfig.get_paths()["stdlib"])
    split: dict[str, list[dict]] = {"train": [], "calib": [], "test": []}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            if any(part in ("test", "tests") or part.startswith("test_") for part in rel.parts):
                continue
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            bucket = zlib.crc32(str(rel).encode()) % 5
            which = "test" if bucket == 0 else "calib" if bucket == 1 else "train"
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_source_segment(source, node) or ""
                    text = " ".join(text[:MAX_CHARS].split())  # whitespace folded: indentation says nothing here
                    if len(text) > 40:
                        split[which].append({"text": text, "label": package})
    return split


def tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
    # Not repeatable to the token: the trainer numbers continuation characters in hash order, which changes
    # from run to run, and breaks ties between equally frequent merges by those numbers (on the full data
    # two runs differed in 7 of 6000 tokens).
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=MAX_LENGTH)


def accuracy(model, tok, rows, batch: int = 64) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            enc = tok([r["text"] for r in chunk], padding=True, truncation=True, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            right += int((pred == torch.tensor([PACKAGES.index(r["label"]) for r in chunk])).sum())
    return right / len(rows)


def main() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=20.0, help="training time (the data and tokenizer come first)")
    ap.add_argument("--steps", type=int, default=None,
                    help="train this many steps instead of for --minutes: the same training on any machine")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=6000)
    ap.add_argument("--tiny", action="store_true", help="a few steps on a small model (tests)")
    args = ap.parse_args()
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    split = functions()
    for name, rows in split.items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(" ".join(f"{k} {len(v)}" for k, v in split.items()), "functions", flush=True)
    train = split["train"][:300] if args.tiny else split["train"]
    tok = tokenizer([r["text"] for r in train], 500 if args.tiny else args.vocab)
    hidden = 32 if args.tiny else args.hidden
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2 if args.tiny else args.layers,
                        num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=MAX_LENGTH,
                        num_labels=len(PACKAGES), id2label=dict(enumerate(PACKAGES)),
                        label2id={p: i for i, p in enumerate(PACKAGES)}, pad_token_id=tok.pad_token_id)
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    labels = torch.tensor([PACKAGES.index(r["label"]) for r in train])
    start, step, deadline = time.time(), 0, (0.2 if args.tiny else args.minutes) * 60

    def done() -> float:  # the share of the budget spent: steps where they are given, else time
        return step / args.steps if args.steps else (time.time() - start) / deadline
    rng = np.random.default_rng(0)
    warmup = 100
    while done() < 1:
        order = rng.permutation(len(train))
        model.train()
        for i in range(0, len(order), 32):
            rows = order[i:i + 32]
            enc = tok([train[r]["text"] for r in rows], padding=True, truncation=True, return_tensors="pt")
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels[rows])
            for group in opt.param_groups:  # warm up, then decay with the time left
                left = max(0.0, 1 - done())
                group["lr"] = 5e-4 * min(1.0, (step + 1) / warmup) * (0.5 - 0.5 * math.cos(math.pi * left))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
            if done() >= 1:
                break
    print(f"{step} steps in {time.time() - start:.0f} s; held-out modules: accuracy "
          f"{accuracy(model, tok, split['test'][:200] if args.tiny else split['test']):.3f}", flush=True)
    model.save_pretrained(args.out / "hf")
    tok.save_pretrained(args.out / "hf")
    print(f"wrote {args.out / 'hf'}", flush=True)


if __name__ == "__main__":
    main()

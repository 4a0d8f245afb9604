"""The standard-library BERT recipe (examples/stdlib_bert/train.py), run tiny: its data holds whole modules out,
and what it writes trains exits and compiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "examples" / "stdlib_bert" / "train.py"


@pytest.mark.slow  # a minute (parsing the standard library); the recipes and compiling are tested on their own
def test_tiny_run_writes_a_model_eec_trains_and_compiles(tmp_path):
    from eec.compiler.encoder_pipeline import compile_encoder
    from eec.runtime import load
    from eec.train.encoder import ClassifierTrainConfig, train_classifier

    run = subprocess.run([sys.executable, str(SCRIPT), "-o", str(tmp_path), "--tiny"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {split: [json.loads(line) for line in open(tmp_path / f"{split}.jsonl")] for split in ("train", "calib", "test")}
    assert all(len(r) > 100 for r in rows.values())
    # whole modules held out: no function text of the test set occurs in training (the same function in two
    # modules aside, which the standard library has a few of)
    train_texts = {r["text"] for r in rows["train"]}
    assert sum(r["text"] in train_texts for r in rows["test"]) < 0.02 * len(rows["test"])
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in rows["train"][:64]))
    train_classifier(tmp_path / "hf", sample, tmp_path / "m.pt", ClassifierTrainConfig("deebert", [1], epochs=1))
    compile_encoder(tmp_path / "m.pt", tmp_path / "m.eec", data=sample)
    model = load(tmp_path / "m.eec")
    got = model.classify([r["text"] for r in rows["test"][:5]], epsilon=0.9)
    assert len(got.labels) == 5 and set(got.names) <= {r["label"] for r in rows["train"]}

"""The digits recipes (examples/digits/train.py), run short: both learn, and eec compiles what they write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="examples/digits reads scikit-learn's bundled digits")

ROOT = Path(__file__).parents[1] / "examples" / "digits"


@pytest.mark.slow  # 25 s of training; saving, compiling and classifying branched networks are tested on their own
def test_both_recipes_learn_and_compile(tmp_path):
    from eec.compiler.branched_pipeline import compile_branched
    from eec.runtime import load

    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "-o", str(tmp_path), "--epochs", "4"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    test = np.load(tmp_path / "test.npz")
    assert test["x"].shape == (497, 1, 8, 8) and test["x"].dtype == np.float32
    sys.path.insert(0, str(ROOT))
    from nets import NETS  # noqa: E402

    for name in ("branchy", "sdn"):
        net = NETS[name]()
        net.load_state_dict(torch.load(tmp_path / f"{name}.state.pt", weights_only=True))
        net.eval()
        with torch.no_grad():
            outs = net(torch.from_numpy(test["x"]))
        accuracy = [float((o.argmax(-1).numpy() == test["y"]).mean()) for o in outs]
        # ten classes, chance is 0.1: four epochs teach the final classifier most digits, and every exit something
        # (SDN's first internal classifier least: its loss weight starts at 0.01)
        assert accuracy[-1] > 0.8 and min(accuracy) > 0.2, accuracy
        compile_branched(tmp_path / f"{name}.pt", tmp_path / f"{name}.eec", data=tmp_path / "calib.npz")
        model = load(tmp_path / f"{name}.eec")
        got = model.classify(test["x"], mode="full")
        assert (got.labels == outs[-1].argmax(-1).numpy()).mean() > 0.99  # ties apart, PyTorch's labels
        assert model.manifest.class_names == [str(d) for d in range(10)]

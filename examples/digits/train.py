"""Train the BranchyNet-style CNN and the SDN-style ResNet on scikit-learn's handwritten digits.

The digits (1797 8x8 scans) ship inside scikit-learn: nothing is downloaded.
A fixed split (seed 0): 800 for training, 500 held out for calibrating
thresholds, 497 held out for testing. Writes into OUT:

- ``branchy.pt`` and ``sdn.pt``: the networks for ``eec compile``
  (`eec.compiler.save_early_exit`);
- ``branchy.state.pt`` and ``sdn.state.pt``: their weights, for the
  benchmark's PyTorch and whole-network peers (``torch.load(weights_only=True)``);
- ``calib.npz`` and ``test.npz``: inputs ``x`` [n, 1, 8, 8] float32 and labels ``y``.

    .venv/bin/python examples/digits/train.py -o digits
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from nets import NETS  # noqa: E402

from eec.compiler import save_early_exit  # noqa: E402

SPLIT = (800, 500)  # training, calibration; the rest is the test set (497)


def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 - 0.5)[:, None]  # [n, 1, 8, 8] in [-0.5, 0.5]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, calib, test = np.split(order, np.cumsum(SPLIT))
    return {"train": (x[train], y[train]), "calib": (x[calib], y[calib]), "test": (x[test], y[test])}


def loss_weights(net: nn.Module, name: str, progress: float) -> list[float]:
    """BranchyNet: fixed weights per exit. SDN: each internal classifier's weight grows linearly from 0.01 to its
    final value over training; the final classifier's is 1."""
    if name == "branchy":
        return net.loss_weights
    return [0.01 + (w - 0.01) * progress for w in net.ic_weights] + [1.0]


def train(name: str, data, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = NETS[name]()
    x, y = map(torch.from_numpy, data["train"])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    step, start = 0, time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            # light augmentation: shift by up to a pixel (the scans are centred by hand, not exactly)
            batch = torch.roll(x[idx], shifts=tuple(np.random.randint(-1, 2, 2)), dims=(2, 3))
            weights = loss_weights(net, name, step / steps)
            loss = sum(w * nn.functional.cross_entropy(out, y[idx]) for w, out in zip(weights, net(batch)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"{name} epoch {epoch + 1}/{epochs} loss {loss.item():.3f} "
                  f"held-out accuracy per exit {accuracy(net, data['calib'])} ({time.time() - start:.0f} s)", flush=True)
    return net.eval()


def accuracy(net: nn.Module, split) -> list[float]:
    net.eval()
    with torch.no_grad():
        outs = net(torch.from_numpy(split[0]))
    return [round(float((o.argmax(-1).numpy() == split[1]).mean()), 3) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--nets", default="branchy,sdn")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    data = digits()
    for split in ("calib", "test"):
        np.savez(args.out / f"{split}.npz", x=data[split][0], y=data[split][1])
    for name in args.nets.split(","):
        net = train(name, data, args.epochs)
        print(f"{name}: test accuracy per exit {accuracy(net, data['test'])}", flush=True)
        torch.save(net.state_dict(), args.out / f"{name}.state.pt")
        save_early_exit(net, torch.from_numpy(data["calib"][0][:8]), args.out / f"{name}.pt",
                        class_names=[str(d) for d in range(10)], metadata={"recipe": name})
        print(f"wrote {args.out / (name + '.pt')}", flush=True)


if __name__ == "__main__":
    main()

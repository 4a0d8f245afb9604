"""Two early-exit CNNs in eec's branched-network contract (docs/format.md): ``stages`` and ``exits``.

- `BranchyCNN`, after BranchyNet (Teerapittayanon et al. 2016): a plain
  convolutional backbone with two side branches, each a small convolution
  and a classifier, trained with the weighted sum of every exit's loss.
- `SDNResNet`, after Shallow-Deep Networks (Kaya et al. 2019): a residual
  network with an internal classifier after every block, each a mix of max
  and average pooling and one linear layer, trained with IC weights that
  grow linearly over training.

Both are sized for 8x8 digits and deliberately deeper than the task needs,
as the networks early exit is meant for are: most digits are easy, and the
first exit should settle them for a fraction of the whole network's work.
"""

from __future__ import annotations

import torch
from torch import nn

CLASSES = 10


def every_exit(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every head's logits, in stage order (what training computes its loss over; eec never calls forward)."""
    outs = []
    for i, stage in enumerate(net.stages):
        x = stage(x)
        outs.append(net.exits[str(i)](x))
    return outs


def conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class BranchyCNN(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        w = width
        self.stages = nn.ModuleList([
            conv(1, 16),  # the first exit's backbone: one narrow convolution
            nn.Sequential(conv(16, w), conv(w, w)),
            nn.Sequential(conv(w, 2 * w), conv(2 * w, 2 * w), conv(2 * w, 2 * w), nn.MaxPool2d(2),
                          conv(2 * w, 2 * w), conv(2 * w, 2 * w)),
        ])
        self.exits = nn.ModuleDict({
            "0": nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                               nn.Linear(16 * 16, CLASSES)),
            "1": nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(w * 16, CLASSES)),
            "2": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, CLASSES)),
        })
        self.loss_weights = [1.0, 0.5, 1.0]  # BranchyNet weighs the final exit highest in its experiments

    def forward(self, x):
        return every_exit(self, x)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class InternalClassifier(nn.Module):
    """SDN's IC: a learned mix of max and average pooling, then a linear layer."""

    def __init__(self, channels: int, size: int = 2):
        super().__init__()
        self.max, self.avg = nn.AdaptiveMaxPool2d(size), nn.AdaptiveAvgPool2d(size)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.fc = nn.Linear(channels * size * size, CLASSES)

    def forward(self, x):
        mixed = self.alpha * self.max(x) + (1 - self.alpha) * self.avg(x)
        return self.fc(mixed.flatten(1))


class SDNResNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.stages = nn.ModuleList([
            nn.Sequential(conv(1, w // 2), Block(w // 2, w // 2)),
            Block(w // 2, w),
            Block(w, 2 * w),
            Block(2 * w, 2 * w),
            Block(2 * w, 4 * w, stride=2),
            Block(4 * w, 4 * w),
        ])
        chans = [w // 2, w, 2 * w, 2 * w, 4 * w]
        self.exits = nn.ModuleDict({str(i): InternalClassifier(c) for i, c in enumerate(chans)})
        self.exits["5"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, CLASSES))
        # SDN: IC i's weight grows linearly from 0.01 to these over training; the final classifier's is 1
        self.ic_weights = [0.15, 0.3, 0.45, 0.6, 0.75]

    def forward(self, x):
        return every_exit(self, x)


NETS = {"branchy": BranchyCNN, "sdn": SDNResNet}


class Whole(nn.Module):
    """The network without its early exits: what a user would export whole (the benchmark's peers)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stages, self.head = net.stages, net.exits[str(len(net.stages) - 1)]

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

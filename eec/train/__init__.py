"""Self-supervised exit-head training (seed: Valade). Torch side, like eec.compiler."""

from eec.train.trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]

"""Device targets: where an artifact will run and what it can run there."""

from eec.targets.profiles import TARGETS, Target, get_target

__all__ = ["TARGETS", "Target", "get_target"]

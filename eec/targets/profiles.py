"""The registry of device profiles.

Only the host CPU (onnxruntime's CPU execution provider, fp32) exists so far;
the Jetson and desktop-GPU profiles, their hardware figures and the latency
model arrive with quantized precisions (issue 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from eec.errors import InputError


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    precisions: tuple[str, ...]
    default_precision: str
    description: str


TARGETS: dict[str, Target] = {
    "cpu": Target(
        name="cpu",
        backend="onnxruntime-cpu",
        precisions=("fp32",),
        default_precision="fp32",
        description="this machine's CPU through onnxruntime's CPU execution provider",
    ),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None


def check_precision(target: Target, precision: str | None) -> str:
    precision = precision or target.default_precision
    if precision not in target.precisions:
        raise InputError(
            f"precision {precision!r} is not available for target {target.name!r}; choose from {', '.join(target.precisions)}"
        )
    return precision

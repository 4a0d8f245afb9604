"""The registry of device profiles: backend, precisions, and the hardware figures the latency model reads.

Figures are the vendors' nominal numbers (docs/targets.md gives each source):
memory bandwidth, dense (not sparse) fp16 and int8 tensor throughput, CPU
cores. ``cpu`` is the machine eec runs on; its figures are rough defaults
until ``eec targets measure`` replaces them with a measured table.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from eec.errors import InputError

CPU_PRECISIONS = ("fp32", "int8", "int8-dynamic", "int4", "int4-gguf")
# int8 on TensorRT is static Q/DQ (`Int8StaticQDQ`), calibrated on recorded graph inputs.
TENSORRT_PRECISIONS = ("fp16", "int8", "fp32")


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # "onnxruntime-cpu", "onnxruntime-cuda" or "tensorrt"
    precisions: tuple[str, ...]
    default_precision: str
    description: str
    bandwidth_gbs: float  # memory bandwidth, GB/s
    fp16_tflops: float  # dense fp16 tensor throughput (fp32 throughput for the host CPU)
    int8_tops: float  # dense int8 throughput
    cpu_cores: int
    call_overhead_us: float  # per graph call: launch, host-side bookkeeping, one device-to-host read
    source: str  # short citation; the full list is in docs/targets.md
    # Fixed cost of one decoder layer or head whatever its size: a dozen-odd kernels each with a
    # few microseconds of latency. At batch 1 on a GPU it dwarfs the roofline (docs/targets.md).
    layer_floor_us: float = 0.0

    @property
    def contrib_ops(self) -> bool:
        """Whether segments use onnxruntime's contrib kernels (`eec.compiler.ops`); TensorRT reads standard ops only."""
        return self.backend.startswith("onnxruntime")

    @property
    def builds_engines(self) -> bool:
        return self.backend == "tensorrt"

    def peak_ops(self, precision: str) -> float:
        """Operations per second the model assumes for ``precision`` (weight-only int4 computes in int8 or fp16)."""
        if precision.startswith("int"):
            return self.int8_tops * 1e12
        return self.fp16_tflops * 1e12

    def to_dict(self) -> dict:
        return asdict(self)


# Measured on an H100 (bench/gpu_layer_latency.py): a SmolLM2 layer replayed as a CUDA graph took
# 95 µs against a 2 µs roofline. TensorRT fuses more, so this is an upper bound there; Jetsons'
# slower clocks are assumed to double it. Unmeasured on any Jetson.
GPU_LAYER_FLOOR_US, JETSON_LAYER_FLOOR_US = 95.0, 190.0


def _jetson(name: str, desc: str, bw: float, fp16: float, int8: float, cores: int, source: str) -> Target:
    return Target(name, "tensorrt", TENSORRT_PRECISIONS, "fp16", desc, bw, fp16, int8, cores, 40.0, source,
                  JETSON_LAYER_FLOOR_US)


def _gpu(name: str, desc: str, bw: float, fp16: float, int8: float, source: str) -> Target:
    return Target(name, "tensorrt", TENSORRT_PRECISIONS, "fp16", desc, bw, fp16, int8, 0, 20.0, source,
                  GPU_LAYER_FLOOR_US)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target(
            "cpu", "onnxruntime-cpu", CPU_PRECISIONS, "fp32",
            "this machine's CPU through onnxruntime's CPU execution provider",
            bandwidth_gbs=20.0, fp16_tflops=0.1, int8_tops=0.2, cpu_cores=os.cpu_count() or 1, call_overhead_us=40.0,
            source="defaults; measure with `eec targets measure`",
        ),
        Target(
            "cuda", "onnxruntime-cuda", ("fp16",), "fp16",
            "this machine's NVIDIA GPU through onnxruntime's CUDA execution provider (onnxruntime-gpu), "
            "the KV cache kept on the GPU",
            # A graph call's fixed cost from the H100 (docs/benchmarks.md, the H100 runs): a pass-through call
            # 33-66 µs, a segment call's fitted fixed cost 62-277 µs; with 150, SmolLM2's 8-layer segments
            # come within 5% of what was measured there, its heads equal, the whole model 15% high.
            # Other figures are rough defaults.
            bandwidth_gbs=1000.0, fp16_tflops=100.0, int8_tops=200.0, cpu_cores=os.cpu_count() or 1,
            call_overhead_us=150.0, source="call overhead measured on an H100; other figures defaults: "
            "measure with `eec targets measure`",
            layer_floor_us=GPU_LAYER_FLOOR_US,
        ),
        _jetson("jetson-orin-agx", "NVIDIA Jetson AGX Orin 64GB (Ampere GA10B, 2048 CUDA cores)",
                204.8, 42.5, 85.0, 12, "Jetson AGX Orin Series Technical Brief v1.2"),
        _jetson("jetson-orin-nx", "NVIDIA Jetson Orin NX 16GB (Ampere, 1024 CUDA cores)",
                102.4, 15.0, 30.0, 8, "Jetson Orin NX Series Data Sheet"),
        _jetson("jetson-orin-nano", "NVIDIA Jetson Orin Nano 8GB (Ampere, 1024 CUDA cores, original clocks)",
                68.0, 10.0, 20.0, 6, "Jetson Orin Nano Series Data Sheet"),
        _gpu("rtx-4090", "NVIDIA GeForce RTX 4090 (Ada AD102)", 1008.0, 165.2, 660.6,
             "NVIDIA Ada GPU Architecture whitepaper, appendix A"),
        _gpu("rtx-3060", "NVIDIA GeForce RTX 3060 12GB (Ampere GA106)", 360.0, 51.2, 102.4,
             "NVIDIA Ampere GA102 whitepaper; GA106 scaled by SM count"),
        _gpu("a100", "NVIDIA A100 80GB SXM (Ampere GA100)", 2039.0, 312.0, 624.0, "NVIDIA A100 Tensor Core GPU datasheet"),
        _gpu("h100", "NVIDIA H100 80GB SXM (Hopper GH100)", 3350.0, 989.0, 1979.0, "NVIDIA H100 Tensor Core GPU datasheet"),
    ]
}


# Families whose members run the same graphs (fp16 standard ops, engines built on the device): only the
# latency model that `--exits auto` places exits with tells them apart.
FAMILIES: dict[str, tuple[str, ...]] = {
    "jetson-orin": ("jetson-orin-agx", "jetson-orin-nx", "jetson-orin-nano"),
    "rtx": ("rtx-4090", "rtx-3060"),
}


def get_target(name: str, placed: bool = False) -> Target:
    """The profile ``name``, or for a family name (`FAMILIES`) its first member, whose graphs every member
    runs; ``placed`` (exits placed by latency) needs the device itself, so a family is refused then."""
    if name in TARGETS:
        return TARGETS[name]
    if name in FAMILIES:
        members = FAMILIES[name]
        if placed:
            raise InputError(f"target {name!r} is a family ({', '.join(members)}) and --exits auto places exits by the "
                             f"device's latency: name the device, e.g. --target {members[-1]}")
        return TARGETS[members[0]]
    families = "; ".join(f"{f} ({', '.join(m)})" for f, m in FAMILIES.items())
    raise InputError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}; families: {families} "
                     "(`eec targets list` describes them)")


def check_precision(target: Target, precision: str | None) -> str:
    precision = precision or target.default_precision
    if precision not in target.precisions:
        raise InputError(
            f"precision {precision!r} is not available for target {target.name!r}; choose from {', '.join(target.precisions)}"
        )
    return precision

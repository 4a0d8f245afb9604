"""Static int8 in Q/DQ form for TensorRT, or for onnxruntime's CPU kernels (onnxruntime's ``quantize_static``).

Rules:
1. Each ``MatMul`` (or each node of ``op_types``: classifiers add ``Conv`` and ``Gemm``) with a constant weight gets QuantizeLinear/DequantizeLinear
   pairs on its activation input and its weight: int8, symmetric (zero point
   0, which TensorRT requires), weights per output channel.
2. Activation scales come from min/max over ``feeds``: real inputs of this
   graph recorded while the fp32 artifact decoded calibration prompts
   (`eec.compiler.precision.record_feeds`).
3. Nothing else is quantized: norms, attention and the heads' softmax stay
   in float, as TensorRT's own int8 recipes for LLMs do.
4. The pass is functional: it returns a new model, ``modified`` when at least
   one Q/DQ pair was inserted.
5. ``for_cpu``: activations are uint8 with a zero point (asymmetric), weights
   int8 per channel, and the graph is first optimised by onnxruntime
   (``quant_pre_process``: batch norm folded into the convolutions, so that
   each Q/DQ convolution runs as one integer kernel). On an AVX-512 VNNI CPU
   (2 cores), the digits ResNet ran 1.6x (batch 1) and 2.6x (batch 64) its
   fp32 speed this way, and 0.45x / 0.5x with rule 1's symmetric int8
   activations, which onnxruntime's CPU provider runs through slower kernels.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

from eec.compiler.passes.weight_only import quiet_logging


class Int8StaticQDQ(FunctionalPass):
    def __init__(self, feeds: list[dict[str, np.ndarray]], op_types: tuple[str, ...] = ("MatMul",),
                 for_cpu: bool = False):
        super().__init__()
        if not feeds:
            raise ValueError("static int8 needs at least one recorded input to calibrate activation scales")
        self.feeds = feeds
        self.op_types = tuple(op_types)
        self.for_cpu = for_cpu

    def call(self, model: ir.Model) -> PassResult:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst, feeds = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", Path(tmp) / "feeds.npz"
            # quant_pre_process copies the graph elsewhere without its external data: inline for it (the
            # classifier graphs it serves are far below protobuf's 2 GiB)
            ir.save(model, src, external_data=None if self.for_cpu else "in.onnx.data")
            np.savez(feeds, **{f"{i}:{k}": v for i, f in enumerate(self.feeds) for k, v in f.items()})
            # The calibrator opens its own onnxruntime session with default options, which the
            # process-wide thread pool eec's runtime installs refuses: calibrate in a fresh process.
            done = subprocess.run([sys.executable, "-m", __name__, str(src), str(dst), str(feeds), ",".join(self.op_types),
                                   "cpu" if self.for_cpu else "tensorrt"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"static int8 quantization failed: {done.stderr.strip().splitlines()[-1:]}")
            new = ir.serde.deserialize_model(onnx.load(dst))
        modified = any(n.op_type == "QuantizeLinear" for n in new.graph)
        return PassResult(new, modified=modified)


def _quantize(src: str, dst: str, feeds_file: str, op_types: str = "MatMul", kernels: str = "tensorrt") -> None:
    with quiet_logging():  # importing the quantizers configures the root logger at INFO
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

    with np.load(feeds_file) as z:
        grouped: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            index, name = key.split(":", 1)
            grouped.setdefault(int(index), {})[name] = z[key]
    feeds = [grouped[i] for i in sorted(grouped)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    cpu = kernels == "cpu"
    with quiet_logging():
        if cpu:
            optimised = str(Path(dst).with_name("optimised.onnx"))
            quant_pre_process(src, optimised, skip_symbolic_shape=True)
            src = optimised
        quantize_static(
            src, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types.split(","),
            per_channel=True, activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8, weight_type=QuantType.QInt8,
            use_external_data_format=True, extra_options={"ActivationSymmetric": not cpu, "WeightSymmetric": True},
        )


if __name__ == "__main__":
    _quantize(*sys.argv[1:6])

"""Dynamic int8 quantization of matrix products (onnxruntime's ``quantize_dynamic``).

Rules:
1. ``MatMul`` nodes with a constant weight get int8 weights, per output
   channel, with activations quantized at run time (``DynamicQuantizeMatMul``
   / ``MatMulInteger`` after onnxruntime's fusions).
2. No other op type is quantized: the embedding ``Gather``, norms, attention
   and the softmax of the heads stay fp32.
3. The pass is functional: it returns a new model, ``modified`` when at least
   one ``MatMul`` was rewritten.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

from eec.compiler.passes.weight_only import quiet_logging


class Int8Dynamic(FunctionalPass):
    def call(self, model: ir.Model) -> PassResult:
        with quiet_logging():  # importing the quantizers configures the root logger at INFO
            from onnxruntime.quantization import QuantType, quantize_dynamic

        before = sum(1 for n in model.graph if n.op_type == "MatMul")
        # quantize_dynamic works on files; weights go through external data so
        # models over 2 GB work too.
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            ir.save(model, src, external_data="in.onnx.data")
            with quiet_logging():
                quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True,
                                 weight_type=QuantType.QInt8, use_external_data_format=True)
            new = ir.serde.deserialize_model(onnx.load(dst))
        after = sum(1 for n in new.graph if n.op_type == "MatMul")
        return PassResult(new, modified=after < before)

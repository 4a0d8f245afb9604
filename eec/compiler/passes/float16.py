"""fp16 weights and compute for GPU targets (onnxruntime's ``convert_float_to_float16``).

Rules:
1. Every float32 initializer and every float32 value inside the graph becomes
   float16; graph inputs and outputs keep float32 (``keep_io_types``), so the
   runtime's contract does not change with the precision.
2. Ops that must stay float32 for accuracy or support (the heads' softmax
   statistics, TopK over probabilities) are blocked, and casts are inserted
   around them.
3. The pass is functional: it returns a new model, ``modified`` when some
   float32 tensor was converted.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

# Kept in fp32: reductions over the vocabulary lose too much in fp16.
BLOCKED = ["Softmax", "LogSoftmax", "TopK", "ReduceSum", "ReduceMean", "Exp", "Log"]


class Float16(FunctionalPass):
    def call(self, model: ir.Model) -> PassResult:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = ir.serde.serialize_model(model)
        converted = convert_float_to_float16(proto, keep_io_types=True, op_block_list=BLOCKED, disable_shape_infer=True)
        new = ir.serde.deserialize_model(converted)
        modified = any(init.dtype == ir.DataType.FLOAT16 for init in new.graph.initializers.values())
        return PassResult(new, modified=modified)

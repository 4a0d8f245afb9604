"""4- or 8-bit weight-only quantization of matrix products (onnxruntime's MatMulNBitsQuantizer).

Rules:
1. A ``MatMul`` whose second input is a constant 2-D initializer becomes one
   ``com.microsoft.MatMulNBits``: symmetric ``bits``-bit weights in blocks of
   ``block_size`` along the input dimension, one fp32 scale per block (the
   block's largest-magnitude weight maps to the most negative level).
2. ``accuracy_level`` 4 lets the CPU kernel quantize activations to int8 for
   the product (onnxruntime-genai's CPU default); 0 keeps fp32 activations.
3. Everything else (the embedding ``Gather``, norms, attention) is unchanged;
   exit heads and the final head are quantized like the backbone.
4. A graph with `Q4CarryOver`'s correction products is quantized
   asymmetrically (its carried weights have levels ``d * q``, zero point 0,
   which only the asymmetric grid reproduces), and those products stay fp32.
5. The pass is functional: it returns a new model, ``modified`` when at least
   one ``MatMul`` was rewritten.
"""

from __future__ import annotations

import contextlib
import logging

import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

from eec.compiler.passes.q4_carry_over import CORRECTION_PREFIX


class WeightOnly(FunctionalPass):
    def __init__(self, bits: int = 4, block_size: int = 32, accuracy_level: int = 4):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two of at least 16, got {block_size}")
        self.bits, self.block_size, self.accuracy_level = bits, block_size, accuracy_level

    def call(self, model: ir.Model) -> PassResult:
        before = _count(model, "MatMul")
        corrections = [n.name for n in model.graph if (n.name or "").startswith(CORRECTION_PREFIX)]
        with quiet_logging():  # importing the quantizer configures the root logger at INFO
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(
                ir.serde.serialize_model(model), bits=self.bits, block_size=self.block_size,
                is_symmetric=not corrections, accuracy_level=self.accuracy_level, nodes_to_exclude=corrections,
            )
            quantizer.process()
        new = ir.serde.deserialize_model(quantizer.model.model)
        return PassResult(new, modified=_count(new, "MatMul") < before)


def _count(model: ir.Model, op_type: str) -> int:
    return sum(1 for node in model.graph if node.op_type == op_type)


@contextlib.contextmanager
def quiet_logging():
    """onnxruntime's quantizers log every node at INFO, some on the root logger, and configure it."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        root.setLevel(level)
        root.handlers[:] = handlers

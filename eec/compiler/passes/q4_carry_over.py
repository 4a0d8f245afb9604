"""Carry a 4-bit GGUF's Q4_1 blocks over to int4 exactly, instead of re-quantizing them.

A Q4_1 block is 32 weights along the input dimension stored as ``d * q + m``
(``q`` in 0..15, a float scale ``d`` and a float minimum ``m``). Loaded from a
GGUF, the fp32 weights hold exactly those values, and int4 re-quantization
with integer zero points cannot land on a grid offset by a float minimum:
on SmolLM2 it costs a third of the tokens' agreement. This pass splits each
such product in two: ``x @ (W - m) + blocksum(x) @ m``. The first has levels
``d * q`` with zero point 0, which onnxruntime's asymmetric int4 quantizer
reproduces exactly (`WeightOnly` quantizes a graph with corrections
asymmetrically); the second is a small fp32 product (one row per block:
1/32 of the weights). It costs four nodes per product: on SmolLM2 decode
runs at about three quarters of plain int4's speed, hence its own
precision, ``int4-gguf``.

Rules:
1. A ``MatMul`` whose weight is a 2-D float initializer ``[K, N]`` with ``K``
   a multiple of ``block_size`` is carried over when every block of
   ``block_size`` weights along ``K`` holds at most 16 levels ``m + d * q``
   (``m`` the block minimum, ``d`` = range / 15) to within ``tolerance`` of
   ``d``; anything else (an fp16 GGUF, a Q8_0 tensor, a trained fp32 model)
   is left alone.
2. Its weight becomes ``W - m`` (block minimum subtracted); the input, summed
   per block (``Reshape`` + ``ReduceSum``), goes through ``MatMul`` with the
   minima ``[K / block_size, N]`` and is added to the product.
3. The correction products are named with the prefix ``q4_carry/`` so that
   the quantizer leaves them fp32 (`CORRECTION_PREFIX`).
4. Blocks of a Q4_0 GGUF (``d * (q - 8)``) need none of this: the symmetric
   quantizer already lands on their grid. The pass is functional and
   reports ``modified`` when at least one product was carried over.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

CORRECTION_PREFIX = "q4_carry/"


def q4_1_minima(w: np.ndarray, block_size: int = 32, tolerance: float = 1e-3) -> np.ndarray | None:
    """The per-block minima ``[K / block_size, N]`` when ``w`` ``[K, N]`` is Q4_1-structured along K, else None."""
    k, n = w.shape
    if k % block_size or w.dtype != np.float32:
        return None
    blocks = w.reshape(k // block_size, block_size, n)
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    step = (high - low) / 15
    safe = np.where(step > 0, step, 1.0)
    levels = (blocks - low[:, None, :]) / safe[:, None, :]
    if not np.all(np.abs(levels - np.round(levels)) <= tolerance):
        return None
    return low


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class Q4CarryOver(FunctionalPass):
    def __init__(self, block_size: int = 32):
        super().__init__()
        self.block_size = block_size

    def call(self, model: ir.Model) -> PassResult:
        model = ir.from_proto(ir.to_proto(model))  # functional: the input model is left as it was
        graph, b = model.graph, self.block_size
        carried = 0
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            x, weight = node.inputs
            if weight is None or weight.const_value is None or not weight.is_initializer() or len(weight.shape) != 2:
                continue
            if x is None or x.shape is None or len(x.shape) != 3:  # segments and heads feed [batch, seq, K]
                continue
            w = weight.const_value.numpy()
            minima = q4_1_minima(w, b)
            if minima is None:
                continue
            k = w.shape[0]
            name = f"{CORRECTION_PREFIX}{carried}"
            weight.const_value = ir.tensor(w - np.repeat(minima, b, axis=0), name=weight.name)
            m_value = _constant(graph, f"{name}/minima", minima.astype(np.float32))
            shape = _constant(graph, f"{name}/shape", np.array([0, 0, k // b, b], dtype=np.int64))
            axes = _constant(graph, f"{name}/axes", np.array([-1], dtype=np.int64))
            # [batch, seq, K] -> [batch, seq, K/b, b] -> per-block sums -> @ minima [K/b, N]
            blocked = ir.node("Reshape", [x, shape], name=f"{name}/reshape")
            sums = ir.node("ReduceSum", [blocked.outputs[0], axes], {"keepdims": 0}, name=f"{name}/sum")
            correction = ir.node("MatMul", [sums.outputs[0], m_value], name=f"{name}/matmul")
            out = node.outputs[0]
            total = ir.node("Add", [out, correction.outputs[0]], name=f"{name}/add")
            for v, suffix in ((blocked.outputs[0], "blocked"), (sums.outputs[0], "sums"),
                              (correction.outputs[0], "product")):
                v.name = f"{name}/{suffix}"
            total.outputs[0].name = f"{name}/out"
            out.replace_all_uses_with(total.outputs[0], replace_graph_outputs=True)
            total.replace_input_with(0, out)  # replace_all_uses_with rewired the Add to itself
            if total.outputs[0].is_graph_output():  # the graph's output keeps its name
                kept = out.name
                out.name = f"{name}/carried"
                total.outputs[0].name = kept
            graph.insert_after(node, [blocked, sums, correction, total])
            carried += 1
        return PassResult(model, modified=carried > 0)

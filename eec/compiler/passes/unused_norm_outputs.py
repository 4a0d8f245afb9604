"""Leave a fused norm's statistics outputs unnamed when nothing reads them, so the kernel skips them.

The exporter names every output of ``com.microsoft.SkipSimplifiedLayerNormalization``
(the custom translation has to return all four), and onnxruntime's kernel then
writes the per-row mean and inverse standard deviation that no node reads. On
SmolLM2 int4 (59 such nodes) dropping them took one decode step from 0.985-0.989x
onnxruntime-genai's graph to 0.99-1.035x (docs/benchmarks.md, int4 parity).

Rules:
1. In each ``SkipSimplifiedLayerNormalization`` node (domain ``com.microsoft``),
   outputs 1 (``mean``) and 2 (``inv_std_var``), both optional in the kernel's
   schema, are renamed to the empty name when no node reads them and they
   are not graph outputs; ONNX reads an empty output name as "not produced".
2. Every other output, node and value is unchanged.
3. The pass works in place; ``modified`` when at least one output was dropped.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

OP = ("com.microsoft", "SkipSimplifiedLayerNormalization")
STATISTICS = (1, 2)  # mean, inv_std_var


class DropUnusedNormOutputs(InPlacePass):
    def call(self, model: ir.Model) -> PassResult:
        graph_outputs = set(model.graph.outputs)
        dropped = 0
        for node in model.graph.all_nodes():
            if (node.domain, node.op_type) != OP:
                continue
            for i in STATISTICS:
                if i < len(node.outputs):
                    value = node.outputs[i]
                    if value.name and not value.uses() and value not in graph_outputs:
                        value.name = ""
                        dropped += 1
        return PassResult(model, modified=dropped > 0)

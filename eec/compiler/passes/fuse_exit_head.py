"""Put an exit head's graph inside its segment's graph, so one session call runs both.

A separate head graph costs a second onnxruntime call per exit, about 3 us
on 2 CPU cores: 2-3% of a token that leaves after three layers of the small
code model, nothing on SmolLM2. The segment keeps its plain graph for
``mode="full"``, which must not pay for heads; early-exit decoding runs this one.

Rules:
1. The segment graph must emit ``hidden_out`` and the head graph take one
   input (``hidden``) and return ``token`` and ``scores`` (and, in artifacts of schema 2,
   ``top_ids`` and ``top_logits``); otherwise the pass changes nothing.
2. The head's input is replaced by the segment's ``hidden_out``; its nodes,
   initializers and intermediate values join the segment graph, renamed
   under ``exit_head/`` so they cannot clash with the segment's names.
3. The head's outputs become the segment's outputs ``exit_token``,
   ``exit_scores`` (``exit_top_ids``, ``exit_top_logits``), placed after its other non-KV outputs and before the
   presents (the runtime reads the outputs before the presents as a group).
4. Opset imports are merged; a domain both graphs import at different
   versions is refused (ValueError), before either graph changes.
5. The head model is consumed: its nodes and initializers move into the
   segment's graph, which is then sorted topologically (the fp16 pass leaves
   a head's input cast after the nodes that read it).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

PREFIX = "exit_head/"
OUTPUTS = {"token": "exit_token", "scores": "exit_scores", "top_ids": "exit_top_ids", "top_logits": "exit_top_logits"}


class FuseExitHead(InPlacePass):
    def __init__(self, head: ir.Model):
        super().__init__()
        self.head = head

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        hidden_out = next((v for v in graph.outputs if v.name == "hidden_out"), None)
        head = self.head.graph
        names = {v.name for v in head.outputs}
        if hidden_out is None or len(head.inputs) != 1 or not {"token", "scores"} <= names <= set(OUTPUTS):
            return PassResult(model, modified=False)
        for domain, version in self.head.opset_imports.items():
            if model.opset_imports.get(domain, version) != version:
                raise ValueError(f"opset {domain or 'ai.onnx'}: segment {model.opset_imports[domain]}, head {version}")
        model.opset_imports.update(self.head.opset_imports)
        ir.convenience.replace_all_uses_with(head.inputs[0], hidden_out)
        head_outputs = list(head.outputs)
        head.outputs.clear()
        for name, value in list(head.initializers.items()):
            del head.initializers[name]
            value.name = PREFIX + name
            graph.register_initializer(value)
        for node in list(head):
            head.remove(node)
            node.name = PREFIX + (node.name or node.op_type)
            for value in node.outputs:
                value.name = OUTPUTS.get(value.name, PREFIX + value.name) if value in head_outputs else PREFIX + value.name
            graph.append(node)
        first_present = next((i for i, v in enumerate(graph.outputs) if v.name.startswith("present_")),
                             len(graph.outputs))
        for offset, value in enumerate(sorted(head_outputs, key=lambda v: list(OUTPUTS.values()).index(v.name))):
            graph.outputs.insert(first_present + offset, value)
        graph.sort()
        return PassResult(model, modified=True)

"""fp16 weights and compute for GPU targets (onnxruntime's ``convert_float_to_float16``).

Rules:
1. Every float32 initializer and every float32 value inside the graph becomes
   float16; graph inputs and outputs keep float32 (``keep_io_types``), so the
   runtime's contract does not change with the precision, except:
2. the KV cache (inputs ``past_*``, outputs ``present_*``) becomes float16 too:
   kept float32, every step would cast the whole cache to half precision and
   back, and a shared KV (GroupQueryAttention appending in place) could not be
   shared. The runtime allocates the cache in the graph's KV type.
3. Ops that must stay float32 for accuracy or support (the heads' softmax
   statistics, TopK over probabilities) are blocked, and casts are inserted
   around them. So is every RMS norm written as plain ops (Pow, ReduceMean,
   Add, Sqrt, Div: `eec.compiler.ops.rms_norm`): in half precision, x² of
   an activation above 256 is infinite. onnxruntime's CPU provider runs most
   fp16 ops in fp32 and never showed it; its CUDA provider does not (a random
   model with activations near 300 gave token 0 for every step on an H100).
   The converter casts every blocked node's output to fp16 and back even
   between two blocked nodes; those round trips are removed, so a norm runs
   in fp32 from its input to its division. Older converters (onnxruntime
   1.30) write one Cast per blocked consumer of a value, all with the same
   output name (an invalid graph); the duplicates are removed.
4. The pass is functional: it returns a new model, ``modified`` when some
   float32 tensor was converted.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

# Kept in fp32: reductions over the vocabulary lose too much in fp16.
BLOCKED = ["Softmax", "LogSoftmax", "TopK", "ReduceSum", "ReduceMean", "Exp", "Log"]


class Float16(FunctionalPass):
    def call(self, model: ir.Model) -> PassResult:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = ir.serde.serialize_model(model)
        typed = {v.name for v in proto.graph.value_info if v.type.tensor_type.elem_type}
        if any(o not in typed for n in proto.graph.node if n.op_type in NORM_CHAIN for o in n.output):
            # The converter casts a blocked node's output back to fp16 only where its type is known.
            proto = onnx.shape_inference.infer_shapes(proto)
        io = [v.name for v in (*model.graph.inputs, *model.graph.outputs)]
        keep = [name for name in io if not name.startswith(("past_", "present_"))]
        norms = rms_norm_nodes(proto.graph)
        converted = convert_float_to_float16(proto, keep_io_types=keep, op_block_list=BLOCKED,
                                             node_block_list=norms, disable_shape_infer=True)
        drop_duplicate_casts(converted.graph)
        drop_cast_round_trips(converted.graph, set(norms) | {n.name for n in converted.graph.node if n.op_type in BLOCKED})
        # An initializer's own type is the truth; a value_info of it may still say float32.
        inits = {i.name for i in converted.graph.initializer}
        for v in [v for v in converted.graph.value_info if v.name in inits]:
            converted.graph.value_info.remove(v)
        new = ir.serde.deserialize_model(converted)
        new.graph.sort()  # the converter appends its casts at the end
        modified = any(init.dtype == ir.DataType.FLOAT16 for init in new.graph.initializers.values())
        return PassResult(new, modified=modified)


NORM_CHAIN = ("Pow", "ReduceMean", "Add", "Sqrt", "Div")


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _cast_to(node) -> int | None:
    """A Cast node's target type; None for any other node."""
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _keep_nodes(graph, kept: list) -> None:
    del graph.node[:]
    graph.node.extend(kept)


def rms_norm_nodes(graph) -> list[str]:
    """Names of the nodes of every plain-op RMS norm: Pow -> ReduceMean -> Add -> Sqrt -> Div, each
    feeding the next (unnamed nodes are named here, so the converter can block them)."""
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"eec_node_{i}"
    consumers = _consumers(graph)
    names = []
    for node in graph.node:
        if node.op_type != NORM_CHAIN[0]:
            continue
        chain = [node]
        for op in NORM_CHAIN[1:]:
            nxt = [c for c in consumers.get(chain[-1].output[0], []) if c.op_type == op]
            if not nxt:
                break
            chain.append(nxt[0])
        if len(chain) == len(NORM_CHAIN):
            names += [n.name for n in chain]
    return names


def drop_duplicate_casts(graph) -> None:
    """Keep the first of several identical Cast nodes (same input, type and output)."""
    seen, kept = set(), []
    for node in graph.node:
        key = (node.output[0], node.input[0], _cast_to(node)) if node.op_type == "Cast" else None
        if key in seen:
            continue
        if key is not None:
            seen.add(key)
        kept.append(node)
    if len(kept) < len(graph.node):
        _keep_nodes(graph, kept)


def drop_cast_round_trips(graph, blocked: set[str]) -> None:
    """Remove Cast(fp16) -> Cast(fp32) pairs after a blocked node: the fp32 value goes straight on."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    drop, rename = set(), {}
    for node in graph.node:
        if _cast_to(node) != onnx.TensorProto.FLOAT16 or producer.get(node.input[0]) is None:
            continue
        if producer[node.input[0]].name not in blocked or node.output[0] in outputs:
            continue
        after = consumers.get(node.output[0], [])
        if not after or any(_cast_to(c) != onnx.TensorProto.FLOAT or c.output[0] in outputs for c in after):
            continue  # a graph output keeps its name, so its producer stays (a head's top logits after TopK)
        for back in after:
            rename[back.output[0]] = node.input[0]
            drop.add(id(back))
        drop.add(id(node))
    if not drop:
        return
    kept = [n for n in graph.node if id(n) not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    _keep_nodes(graph, kept)

"""`DropPaddingMask`: an encoder graph's twin without the padding mask computes, on unpadded rows, exactly what
the graph computes with a mask of ones, and the pass leaves alone a graph whose mask does more than mask."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from eec.compiler.passes import DropPaddingMask
from eec.runtime.sessions import session_options

HIDDEN, HEADS = 8, 2


def attention_graph(extra_use: bool = False) -> onnx.ModelProto:
    """x [batch, seq, 8] -> Attention(x, w, b, Cast(mask)) + 1; ``extra_use``: the mask also feeds a ReduceSum
    output (its values matter beyond masking)."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [HIDDEN, 3 * HIDDEN],
                           rng.standard_normal(3 * HIDDEN * HIDDEN).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3 * HIDDEN], rng.standard_normal(3 * HIDDEN).tolist())
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [helper.make_node("Cast", ["attention_mask"], ["mask32"], to=TensorProto.INT32),
             helper.make_node("Attention", ["x", "w", "b", "mask32"], ["att"], domain="com.microsoft", num_heads=HEADS),
             helper.make_node("Add", ["att", "one"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if extra_use:
        nodes.append(helper.make_node("ReduceSum", ["attention_mask"], ["lengths"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w, b, one])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def session(model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


def test_the_twin_equals_the_graph_on_unpadded_rows_and_differs_on_padded_ones():
    proto = attention_graph()
    result = DropPaddingMask()(ir.serde.deserialize_model(proto))
    assert result.modified
    graph = result.model.graph
    assert [v.name for v in graph.inputs] == ["x"] and [n.op_type for n in graph] == ["Attention", "Add"]
    assert len(next(iter(graph)).inputs) == 3  # rule 2: the mask slot gone, nothing empty left behind
    with_mask, twin = session(proto), session(result.model)
    x = np.random.default_rng(1).standard_normal((3, 5, HIDDEN)).astype(np.float32)
    ones = np.ones((3, 5), np.int64)
    want, = with_mask.run(None, {"x": x, "attention_mask": ones})
    got, = twin.run(None, {"x": x})
    assert np.array_equal(got, want)  # adding a zero mask changes no bit
    padded = ones.copy()
    padded[1, 3:] = 0  # what the twin must never be given: it would attend to the padding
    masked, = with_mask.run(None, {"x": x, "attention_mask": padded})
    assert np.array_equal(masked[[0, 2]], got[[0, 2]]) and not np.allclose(masked[1, :3], got[1, :3], atol=1e-3)


def test_a_mask_used_beyond_attention_is_left_alone():
    model = ir.serde.deserialize_model(attention_graph(extra_use=True))
    nodes = [n.op_type for n in model.graph]
    assert not DropPaddingMask()(model).modified
    assert [n.op_type for n in model.graph] == nodes and [v.name for v in model.graph.inputs] == ["x", "attention_mask"]
    assert not DropPaddingMask("no_such_input")(ir.serde.deserialize_model(attention_graph())).modified

"""The fp16 pass: half-precision KV in and out, float32 hidden states, and RMS norms kept in float32."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from eec.compiler.passes.float16 import NORM_CHAIN, Float16
from eec.runtime.sessions import session_options

HIDDEN = 8


def norm_model() -> onnx.ModelProto:
    """y = rms_norm(x) * w @ m, written as `eec.compiler.ops.rms_norm` exports it (x feeds both Pow and
    Div), and a KV passthrough past_key -> present_key."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 4, "m"),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="mean", keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"], name="add"),
        helper.make_node("Sqrt", ["var"], ["rms"], name="sqrt"),
        helper.make_node("Div", ["x", "rms"], ["normed"], name="div"),
        helper.make_node("Mul", ["normed", "w"], ["scaled"], name="mul"),
        helper.make_node("MatMul", ["scaled", "m"], ["y"], name="matmul"),
        helper.make_node("Identity", ["past_key_0"], ["present_key_0"], name="kv"),
    ]
    graph = helper.make_graph(
        nodes, "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, HIDDEN]),
         helper.make_tensor_value_info("past_key_0", TensorProto.FLOAT, [1, 1, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, HIDDEN]),
         helper.make_tensor_value_info("present_key_0", TensorProto.FLOAT, [1, 1, 3, 4])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def converted() -> onnx.ModelProto:
    result = Float16()(ir.serde.deserialize_model(norm_model()))
    assert result.modified
    return ir.serde.serialize_model(result.model)


def test_kv_is_half_precision_and_hidden_states_stay_float():
    model = converted()
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert types == {"x": TensorProto.FLOAT, "y": TensorProto.FLOAT,
                     "past_key_0": TensorProto.FLOAT16, "present_key_0": TensorProto.FLOAT16}
    assert numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "m")).dtype == np.float16


def test_the_norm_runs_in_float32_from_its_input_to_its_division():
    model = converted()
    onnx.checker.check_model(model, full_check=True)  # one writer per value (older converters wrote two casts)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    by_op = {n.op_type: n for n in model.graph.node}
    for op in NORM_CHAIN:
        node = by_op[op]
        assert types[node.output[0]] == TensorProto.FLOAT, op
        assert all(types.get(i) != TensorProto.FLOAT16 for i in node.input), op
    producer = {o: n for n in model.graph.node for o in n.output}
    for before, op in zip(NORM_CHAIN, NORM_CHAIN[1:]):  # no fp16 round trip between the chain's nodes
        assert any(producer[i].op_type == before for i in by_op[op].input if i in producer), op


def test_activations_in_the_hundreds_do_not_overflow():
    x = np.random.default_rng(1).standard_normal((1, 2, HIDDEN)).astype(np.float32) * 300  # x² > fp16's 65504
    past = np.zeros((1, 1, 3, 4), np.float16)
    options = session_options()  # the process-wide thread pool other tests may have set up
    want = ort.InferenceSession(norm_model().SerializeToString(), options).run(
        ["y"], {"x": x, "past_key_0": past.astype(np.float32)})[0]
    got = ort.InferenceSession(converted().SerializeToString(), options).run(["y"], {"x": x, "past_key_0": past})[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)

"""`DropUnusedNormOutputs`: a fused norm's unread statistics are no longer produced, and nothing else changes."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from eec.compiler.passes import DropUnusedNormOutputs
from eec.runtime import load
from eec.runtime.sessions import session_options

H = 16


def norm_model(mean_is_output: bool) -> ir.Model:
    """x, skip -> SkipSimplifiedLayerNormalization -> (normed, [mean], sum); inv_std_var never read."""
    outputs = ["normed", "mean", "inv_std", "total"]
    node = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], outputs, domain="com.microsoft",
                            epsilon=1e-5)
    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, H])
    graph_outputs = [tensor("normed"), tensor("total")]
    if mean_is_output:
        graph_outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    gamma = helper.make_tensor("gamma", TensorProto.FLOAT, [H], np.linspace(0.5, 1.5, H).tolist())
    graph = helper.make_graph([node], "g", [tensor("x"), tensor("skip")], graph_outputs, [gamma])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    return ir.serde.deserialize_model(model)


def run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), session_options())
    return session.run(None, feeds)


def test_unread_statistics_are_dropped_and_outputs_unchanged():
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, 2, H)).astype(np.float32) for n in ("x", "skip")}
    before = run(norm_model(False), feeds)
    model = norm_model(False)
    assert DropUnusedNormOutputs()(model).modified
    names = [v.name for v in next(iter(model.graph)).outputs]
    assert names == ["normed", "", "", "total"]  # rule 1
    for got, want in zip(run(model, feeds), before):  # rule 2
        np.testing.assert_array_equal(got, want)
    assert not DropUnusedNormOutputs()(model).modified  # rule 3: nothing left to drop


def test_a_statistic_that_is_read_stays():
    model = norm_model(True)
    assert DropUnusedNormOutputs()(model).modified  # inv_std_var goes...
    assert [v.name for v in next(iter(model.graph)).outputs] == ["normed", "mean", "", "total"]  # ...mean stays


def test_compiled_segments_produce_no_statistics(tiny_compiled):
    spec = load(tiny_compiled.artifact).manifest.segments[0]
    nodes = [n for n in onnx.load(tiny_compiled.artifact / spec.file, load_external_data=False).graph.node
             if n.op_type == "SkipSimplifiedLayerNormalization"]
    if spec.kv_cache == "shared":  # fused kernels; the plain-op form (head size 8) has none
        assert nodes
    assert all(list(n.output[1:3]) == ["", ""] for n in nodes)

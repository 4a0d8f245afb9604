"""Precision passes: each against an independent reference, and whole artifacts against their fp32 twin."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from eec.compiler import compile_model
from eec.compiler.passes import Float16, Int8Dynamic, Q4CarryOver, WeightOnly
from eec.compiler.precision import record_feeds
from eec.errors import InputError
from eec.runtime import load
from eec.runtime.evaluate import agreement
from eec.runtime.sessions import session_options
from tests.reference import blockwise_weights

K, N = 64, 48


def matmul_model(weight: np.ndarray) -> ir.Model:
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])], [numpy_helper.from_array(weight, "w")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def matmul_model_3d(weight: np.ndarray) -> ir.Model:
    """x [1, seq, K] @ weight, as segments and heads feed their products."""
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", N])], [numpy_helper.from_array(weight, "w")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def q4_1_weight(rng) -> np.ndarray:
    """A weight as a Q4_1 GGUF stores it, dequantized: blocks of 32 along K of d * q + m (fp16 d and m)."""
    q = rng.integers(0, 16, (K, N))
    q[0::32], q[1::32] = 0, 15  # llama.cpp's d = range / 15: every block holds both ends
    d = rng.uniform(0.01, 0.05, (K // 32, N)).astype(np.float16).astype(np.float32)
    m = -rng.uniform(0.1, 0.4, (K // 32, N)).astype(np.float16).astype(np.float32)
    return (np.repeat(d, 32, 0) * q + np.repeat(m, 32, 0)).astype(np.float32)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    # eec's own options: once eec's runtime made the process-wide thread pool, sessions must share it.
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture
def weight_and_input():
    rng = np.random.default_rng(0)
    return rng.standard_normal((K, N)).astype(np.float32), rng.standard_normal((3, K)).astype(np.float32)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 16), (8, 32)])
def test_weight_only_matches_blockwise_reference(weight_and_input, bits, block):
    w, x = weight_and_input
    result = WeightOnly(bits, block_size=block, accuracy_level=0)(matmul_model(w))
    assert result.modified
    assert [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    got = run(result.model, x)
    want = x @ blockwise_weights(torch.from_numpy(w), block, bits).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, x @ w, atol=1e-4)  # it did quantize


def test_int8_dynamic_is_close_and_quantized(weight_and_input):
    w, x = weight_and_input
    result = Int8Dynamic()(matmul_model(w))
    assert result.modified
    assert "MatMul" not in [n.op_type for n in result.model.graph]
    got, exact = run(result.model, x), x @ w
    assert np.abs(got - exact).max() / np.abs(exact).max() < 0.03


def test_float16_keeps_io_and_converts_weights(weight_and_input):
    w, x = weight_and_input
    result = Float16()(matmul_model(w))
    assert result.modified
    assert all(v.dtype == ir.DataType.FLOAT16 for v in result.model.graph.initializers.values())
    got = run(result.model, x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, x @ w.astype(np.float16).astype(np.float32), rtol=2e-2, atol=2e-2)


def test_weight_only_rejects_bad_settings():
    with pytest.raises(ValueError):
        WeightOnly(4, block_size=24)
    with pytest.raises(ValueError):
        WeightOnly(3)


PROMPT = [3, 17, 42, 8, 91, 5]


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic", "int4"])
def test_quantized_artifact_computes_its_quantized_twin(llama_src, precision):
    """A quantized artifact predicts what a transformers twin with the same quantization predicts
    (`tests.reference.quantized_twin`: weights dequantized and activations quantized as onnxruntime's
    kernels document it), teacher-forced on the artifact's own greedy tokens. The two may differ only
    where the twin's own token is fragile: where scaling its activations by 1 ± 1e-6 (about what two
    fp32 computations of one value differ by after a few layers) moves one across a rounding step of
    the int8 activations and changes the token."""
    from transformers import AutoModelForCausalLM

    from eec.runtime.evaluate import teacher_forced
    from tests.reference import quantized_twin, stepwise_logits

    out = llama_src / f"{precision}.eec"
    manifest = compile_model(llama_src / "hf", out, exits=[2, 4], precision=precision, calibrate=False)
    assert manifest.precision == precision
    ops = {n.op_type for f in manifest.files if f.endswith(".onnx") for n in onnx.load(out / f, load_external_data=False).graph.node}
    assert ("MatMulNBits" in ops) == (precision in ("int4", "int8"))
    assert "MatMul" not in ops  # every projection was rewritten (dynamic int8: MatMulInteger)
    model = load(out)
    reference = model.generate(PROMPT, max_new_tokens=48, mode="full").tokens
    got, _ = teacher_forced(model, PROMPT, reference)
    hf = AutoModelForCausalLM.from_pretrained(llama_src / "hf").eval()
    want = stepwise_logits(quantized_twin(hf, precision), PROMPT, reference).argmax(-1).tolist()
    fragile = set()
    for jitter in (1e-6, -1e-6):
        moved = stepwise_logits(quantized_twin(hf, precision, jitter=jitter), PROMPT, reference).argmax(-1).tolist()
        fragile |= {i for i, (a, b) in enumerate(zip(moved, want)) if a != b}
    assert len(fragile) <= len(want) // 8, "too many fragile positions for the check to mean anything"
    assert {i for i, (a, b) in enumerate(zip(got, want)) if a != b} <= fragile
    # The fp32 model is no reference for it: quantization flips the near-ties random tiny models have.
    plain = stepwise_logits(hf, PROMPT, reference).argmax(-1).tolist()
    assert sum(a == b for a, b in zip(got, plain)) < len(got) - len(fragile)
    again = [model.generate(PROMPT, max_new_tokens=16, mode="full").tokens for _ in range(2)]
    assert again[0] == again[1]


def test_precision_the_target_cannot_run(llama_src):
    with pytest.raises(InputError, match="not available for target 'cpu'"):
        compile_model(llama_src / "hf", llama_src / "x.eec", precision="fp16", calibrate=False)
    with pytest.raises(InputError, match="not available for target 'jetson-orin-agx'"):
        compile_model(llama_src / "hf", llama_src / "x.eec", target="jetson-orin-agx", precision="int4", calibrate=False)
    assert not (llama_src / "x.eec").exists()


def test_tensorrt_int8_is_symmetric_qdq_calibrated_on_recorded_inputs(llama_src):
    fp32 = llama_src / "fp32.eec"
    if not fp32.exists():
        compile_model(llama_src / "hf", fp32, exits=[2, 4], calibrate=False)
    out = llama_src / "trt-int8.eec"
    manifest = compile_model(llama_src / "hf", out, exits=[2, 4], target="rtx-4090", precision="int8", calibrate=False)
    files = [f for f in manifest.files if f.endswith(".onnx")]
    # three segments, the shared exit head, the two exit segments with it inside, the last one's verify graph
    assert len(files) == 7
    for f in files:
        graph = onnx.load(out / f).graph
        ops = [n.op_type for n in graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "DynamicQuantizeLinear" not in ops
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in inits:
                assert not inits[node.input[2]].any()  # symmetric: zero points 0, as TensorRT needs
    reference = load(fp32).generate(PROMPT, max_new_tokens=32, mode="full").tokens
    assert agreement(load(out), PROMPT, reference) >= 0.5  # runs on the host CPU too; int8 stays close
    # The recorder sees concat-KV segments' inputs (TensorRT's); a CPU artifact's bound ones it is refused.
    assert load(fp32).manifest.segments[0].kv_cache == "shared"
    with pytest.raises(ValueError, match="concat-KV artifacts only"):
        record_feeds(fp32, [PROMPT])


def test_q4_1_blocks_are_carried_over_exactly():
    rng = np.random.default_rng(3)
    w, x = q4_1_weight(rng), rng.standard_normal((1, 5, K)).astype(np.float32)
    carried = Q4CarryOver(32)(matmul_model_3d(w))
    assert carried.modified
    exact = WeightOnly(4, block_size=32, accuracy_level=0)(carried.model).model
    assert sorted(n.op_type for n in exact.graph) == ["Add", "MatMul", "MatMulNBits", "ReduceSum", "Reshape"]
    np.testing.assert_allclose(run(exact, x), x @ w, rtol=1e-5, atol=1e-5)  # the 4-bit codes are the GGUF's
    requantized = run(WeightOnly(4, block_size=32, accuracy_level=0)(matmul_model_3d(w)).model, x)
    assert np.abs(requantized - x @ w).max() > 100 * np.abs(run(exact, x) - x @ w).max()


def test_weights_that_are_not_q4_1_are_left_alone(weight_and_input):
    w, _ = weight_and_input
    rng = np.random.default_rng(4)
    for weight in (w, q4_1_weight(rng) + rng.normal(0, 1e-3, (K, N)).astype(np.float32)):
        result = Q4CarryOver(32)(matmul_model_3d(weight))
        assert not result.modified and [n.op_type for n in result.model.graph] == ["MatMul"]
    # blocks of 16 split a block of 32: a half need not span 0..15, so the grid is not recovered
    assert not Q4CarryOver(16)(matmul_model_3d(q4_1_weight(rng))).modified

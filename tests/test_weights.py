"""Each weight stored once: the shared weights file against the model's own parameter bytes, and the
rewritten graphs against the graphs they replace."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from eec.compiler import compile_model
from eec.compiler.weights import ALIGN, INLINE, TIE_FROM, WEIGHTS, store_once
from eec.runtime import load
from eec.runtime.sessions import open_sessions
from tests.conftest import tiny_model


def _matmul_graph(path, weights: dict[str, np.ndarray], order: list[str]) -> None:
    """x @ w for each named weight in turn, saved with its weights in ``<name>.data`` as the exporter does."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n", weights[order[0]].shape[0]]))
    nodes, current = [], x
    inits = []
    for name in order:
        w = ir.Value(name=name, const_value=ir.tensor(weights[name], name=name), type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape(weights[name].shape))
        inits.append(w)
        node = ir.node("MatMul", [current, w])
        nodes.append(node)
        current = node.outputs[0]
    current.name = "y"
    graph = ir.Graph([x], [current], nodes=nodes, initializers=inits, opset_imports={"": 20})
    ir.save(ir.Model(graph, ir_version=10), path, external_data=f"{path.name}.data")


def _run(path, x):
    return open_sessions(path.parent, [path.name])[0].run(["y"], {"x": x})[0]  # eec's options: a suite may share threads


def test_shared_and_transposed_weights_are_stored_once_and_compute_the_same(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)  # 1 MiB: large enough to be tied by transpose
    assert a.nbytes >= TIE_FROM
    b = rng.standard_normal((512, 512)).astype(np.float32)
    _matmul_graph(tmp_path / "one.onnx", {"a": a, "b": b}, ["a", "b"])
    _matmul_graph(tmp_path / "two.onnx", {"b2": b, "at": np.ascontiguousarray(a.T)}, ["b2", "at"])
    x = rng.standard_normal((3, 512)).astype(np.float32)
    before = [_run(tmp_path / f, x) for f in ("one.onnx", "two.onnx")]
    report = store_once(tmp_path, ["one.onnx", "two.onnx"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.onnx", "two.onnx", WEIGHTS]  # per-graph files gone
    assert report.tied == ["two.onnx: at"]
    assert report.written == a.nbytes + b.nbytes and report.referenced == 4 * a.nbytes
    assert (tmp_path / WEIGHTS).stat().st_size <= a.nbytes + b.nbytes + ALIGN
    after = [_run(tmp_path / f, x) for f in ("one.onnx", "two.onnx")]
    for got, want in zip(after, before):
        np.testing.assert_array_equal(got, want)


def test_small_initializers_stay_inside_their_graph(tmp_path):
    w = np.ones((4, 4), np.float32)  # 64 bytes
    assert w.nbytes < INLINE
    _matmul_graph(tmp_path / "g.onnx", {"w": w}, ["w"])
    store_once(tmp_path, ["g.onnx"])
    assert (tmp_path / WEIGHTS).stat().st_size == 0
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(_run(tmp_path / "g.onnx", x), x @ w)


@pytest.fixture(scope="module")
def tied_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    hf = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                    hidden_size=128, intermediate_size=256, vocab_size=2048)
    hf.save_pretrained(root / "hf")
    return root, hf


def _weights_bytes(artifact) -> int:
    return (artifact / "graphs" / WEIGHTS).stat().st_size


# fp16 (a Jetson's standard-ops graphs, 30 s) runs in the slow set: storing once is the same pass on any dtype,
# and fp32 checks the tied head read through a transpose.
@pytest.mark.parametrize("precision", ["fp32", pytest.param("fp16", marks=pytest.mark.slow), "int4"])
def test_an_artifact_with_every_graph_holds_each_weight_once(tied_hf, precision):
    """Shared heads at two exits, each fused into its segment too, and the verify graph: the weights
    file is no larger than the one-segment artifact's, and in fp32/fp16 than the model's parameters."""
    root, hf = tied_hf
    target = "jetson-orin-agx" if precision == "fp16" else "cpu"
    full, exits = root / f"full-{precision}.eec", root / f"exits-{precision}.eec"
    options = dict(target=target, precision=precision, calibrate=False, overwrite=True)
    compile_model(root / "hf", full, exits=[], **options)
    compile_model(root / "hf", exits, exits=[2, 4], fuse_heads="on", speculative="on", **options)
    manifest = load(exits).manifest
    assert all(s.graph("with_head") for s in manifest.segments[:-1]) and manifest.segments[-1].graph("verify")
    assert _weights_bytes(exits) <= 1.05 * _weights_bytes(full)
    if precision != "int4":  # the tied embedding and LM head once: the parameters as torch counts them
        parameters = sum(p.numel() for p in hf.parameters()) * (4 if precision == "fp32" else 2)
        assert parameters * 0.95 <= _weights_bytes(exits) <= 1.05 * parameters


def test_shared_weights_decode_as_transformers(tied_hf):
    """The stored-once graphs, tied head read through a transpose included: full and speculative mode
    against transformers' greedy tokens, every token leaving at the first exit (the segment's graph with
    the shared head inside) against that head over transformers' hidden states."""
    import math

    from tests.reference import exit_tokens, hf_forward, hf_greedy

    root, hf = tied_hf
    art = root / "exits-fp32.eec"
    if not art.exists():
        compile_model(root / "hf", art, exits=[2, 4], fuse_heads="on", speculative="on", calibrate=False)
    model = load(art)
    prompt = [5, 17, 300, 1024]
    want = hf_greedy(hf, prompt, 10)
    assert model.generate(prompt, mode="full", max_new_tokens=10).tokens == want
    assert model.generate(prompt, mode="speculative", max_new_tokens=10).tokens == want
    first = model.generate(prompt, thresholds=-math.inf, max_new_tokens=10)
    assert first.tokens[0] == want[0] and set(first.exits[1:]) == {2}  # the prompt's token runs every layer
    hidden = hf_forward(hf, prompt + first.tokens).hidden_states
    assert exit_tokens(hf, hidden, 2)[len(prompt):-1] == first.tokens[1:]

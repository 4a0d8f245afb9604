"""Exit heads fused into their segments (`FuseExitHead`, `--fuse-heads`): the fused graph computes what
the segment and its head compute apart, and decoding with it leaves at the same layers with the same tokens."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from eec.calib.calibrate import collect_traces
from eec.compiler import compile_model
from eec.compiler.passes import FuseExitHead
from eec.runtime import load
from eec.runtime.sessions import session_options
from tests.conftest import TINY_SHAPES, tiny_model

EXITS = [2, 4]
PROMPTS = [[7, 21, 3, 55, 11], [4, 4, 90, 12, 60, 33, 2], [1, 2, 3]]


@pytest.fixture(scope="module", params=["llama-gqa-untied", "llama-gqa-hd8"])
def twins(request, tmp_path_factory):
    """One tiny model compiled with and without fused heads: GroupQueryAttention (shared KV) and plain ops."""
    model_type, overrides = TINY_SHAPES[request.param]
    root = tmp_path_factory.mktemp("fuse")
    tiny_model(model_type, **overrides).save_pretrained(root / "hf")
    for name, fuse in (("on", "on"), ("off", "off")):
        compile_model(root / "hf", root / f"{name}.eec", exits=EXITS, fuse_heads=fuse, calibrate=False)
    return root / "on.eec", root / "off.eec"


def random_feeds(session: ort.InferenceSession, seq: int = 3, past: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 96, (1, seq))
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(past, past + seq)[None, :]
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past + seq), dtype=np.int64)
        elif i.name == "hidden":
            feeds[i.name] = rng.standard_normal((1, seq, i.shape[2])).astype(np.float32)
        else:  # past key/value: [batch, kv_heads, past, head_dim]
            feeds[i.name] = rng.standard_normal((1, i.shape[1], past, i.shape[3])).astype(np.float32)
    return {k: v.astype(np.int64) if v.dtype.kind == "i" else v for k, v in feeds.items()}


def test_fused_graph_computes_segment_then_head(twins, tmp_path):
    _, off = twins
    spec = load(off).manifest.segments[1]  # takes `hidden`, exit at layer 4
    segment, head = ir.load(off / spec.file), ir.load(off / spec.exit.file)
    nodes = segment.graph.num_nodes() + head.graph.num_nodes()
    result = FuseExitHead(head)(segment)
    assert result.modified
    assert result.model.graph.num_nodes() == nodes and head.graph.num_nodes() == 0  # rule 5: the head moved in
    names = [v.name for v in result.model.graph.outputs]
    head_outputs = ["exit_token", "exit_scores", "exit_top_ids", "exit_top_logits"]
    assert names[:5] == ["hidden_out", *head_outputs] and all(n.startswith("present_") for n in names[5:])
    ir.save(result.model, tmp_path / "fused.onnx", external_data="fused.onnx.data")

    fused, plain, head_session = (ort.InferenceSession(str(f), session_options())
                                  for f in (tmp_path / "fused.onnx", off / spec.file, off / spec.exit.file))
    feeds = random_feeds(plain)
    want = plain.run(None, feeds)
    want_token, want_scores, want_ids, want_logits = head_session.run(None, {"hidden": want[0]})
    got = dict(zip(names, fused.run(None, feeds)))
    np.testing.assert_allclose(got["hidden_out"], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["exit_token"], want_token)
    np.testing.assert_allclose(got["exit_scores"], want_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["exit_top_logits"], want_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["exit_top_ids"][:, :8], want_ids[:, :8])
    for name, value in zip(plain.get_outputs()[1:], want[1:]):
        np.testing.assert_allclose(got[name.name], value, rtol=1e-5, atol=1e-5)


def test_a_graph_without_hidden_out_is_left_alone(twins):
    _, off = twins
    manifest = load(off).manifest
    last, head = ir.load(off / manifest.segments[-1].file), ir.load(off / manifest.segments[0].exit.file)
    assert not FuseExitHead(head)(last).modified  # rule 1: the last segment ends in the final head


def test_conflicting_opsets_are_refused(twins):
    _, off = twins
    spec = load(off).manifest.segments[0]
    segment, head = ir.load(off / spec.file), ir.load(off / spec.exit.file)
    head.opset_imports[""] = segment.opset_imports[""] + 1
    before = segment.graph.num_nodes()
    with pytest.raises(ValueError, match="opset"):
        FuseExitHead(head)(segment)
    assert segment.graph.num_nodes() == before  # refused before anything moved


def test_decoding_with_fused_heads_matches_separate_heads(twins):
    on, off = (load(p) for p in twins)
    assert [s.graph("with_head") for s in on.manifest.segments] == ["graphs/seg0_with_head.onnx",
                                                          "graphs/seg1_with_head.onnx", None]
    assert all(s.graph("with_head") is None for s in off.manifest.segments)
    for threshold in (0.2, 0.5):  # top-2 margins: some tokens leave at each exit, some go through
        for prompt in PROMPTS:
            a = on.generate(prompt, max_new_tokens=12, thresholds=threshold)
            b = off.generate(prompt, max_new_tokens=12, thresholds=threshold)
            assert (a.tokens, a.exits) == (b.tokens, b.exits)
    seen = {layer for prompt in PROMPTS for layer in on.generate(prompt, max_new_tokens=12, thresholds=0.5).exits}
    assert len(seen) > 1, "the thresholds should make tokens leave at more than one depth"
    a, b = collect_traces(on, PROMPTS, 10), collect_traces(off, PROMPTS, 10)
    np.testing.assert_array_equal(a.final, b.final)
    np.testing.assert_array_equal(a.agreed, b.agreed)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)


def test_full_mode_never_opens_the_fused_graphs(twins):
    model = load(twins[0])
    full = model.generate(PROMPTS[0], max_new_tokens=6, mode="full")
    with_heads = lambda: sorted(f for f in model.opened if f.endswith("_with_head.onnx"))  # noqa: E731
    assert with_heads() == [] and set(full.exits) == {6}
    model.generate(PROMPTS[0], max_new_tokens=6, thresholds=0.5)
    assert with_heads() == ["graphs/seg0_with_head.onnx", "graphs/seg1_with_head.onnx"]

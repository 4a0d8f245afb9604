"""Exports kept in memory (`eec.compiler.export_cache`): a repeat compile writes the same graphs without
exporting, anything the export reads changes the key, and a graph from memory is still checked."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_SHAPES, tiny_model


def _graph_hashes(artifact):
    files = json.loads((artifact / "manifest.json").read_text())["files"]
    return {name: digest for name, digest in files.items() if name.startswith("graphs/")}


def test_a_repeat_compile_writes_the_same_graphs_without_exporting(llama_src, tmp_path, monkeypatch):
    import eec.compiler.export as export
    from eec.compiler import compile_model

    calls = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    export.EXPORTS.clear()
    fresh = tmp_path / "fresh.eec"
    compile_model(llama_src / "hf", fresh, exits=[2, 4], calibrate=False)
    exported = len(calls)
    assert exported >= 4  # three segments and the exit head at least

    again = tmp_path / "again.eec"
    compile_model(llama_src / "hf", again, exits=[2, 4], calibrate=False, precision="int8-dynamic")
    assert len(calls) == exported  # every graph came from memory
    # int8 from the same fp32 graphs: the quantizer saw what a fresh export gives it
    monkeypatch.setattr(export.EXPORTS, "limit", 0)
    reference = tmp_path / "reference.eec"
    compile_model(llama_src / "hf", reference, exits=[2, 4], calibrate=False, precision="int8-dynamic")
    assert len(calls) == 2 * exported
    assert _graph_hashes(again) == _graph_hashes(reference)


def test_the_key_changes_with_anything_the_export_reads():
    from eec.compiler.export_cache import ExportCache

    cache = ExportCache()
    model_type, overrides = TINY_SHAPES["llama-gqa-untied"]

    def layer(**changes):
        module = tiny_model(model_type, **overrides).model.layers[0]
        for name, value in changes.items():
            setattr(module, name, value)
        return module

    x = torch.zeros(2, 3, 64)
    base = cache.key(layer(), (x,), ["x"], ["y"], None, "seg0.onnx")
    assert base == cache.key(layer(), (x,), ["x"], ["y"], None, "seg0.onnx")  # rebuilt alike: the same key
    assert base != cache.key(layer(), (torch.zeros(2, 4, 64),), ["x"], ["y"], None, "seg0.onnx")  # shapes
    assert base != cache.key(layer(), (x.double(),), ["x"], ["y"], None, "seg0.onnx")  # types
    assert base != cache.key(layer(), (x,), ["x"], ["z"], None, "seg0.onnx")  # names
    assert base != cache.key(layer(), (x,), ["x"], ["y"], None, "seg1.onnx")  # the file (external data's name)
    assert base != cache.key(layer(flag=True), (x,), ["x"], ["y"], None, "seg0.onnx")  # a plain attribute
    changed = layer()
    with torch.no_grad():
        changed.mlp.up_proj.weight[0, 0] += 1e-6
    assert base != cache.key(changed, (x,), ["x"], ["y"], None, "seg0.onnx")  # a weight
    buffered = layer()
    buffered.register_buffer("ids", torch.arange(3), persistent=False)
    other = layer()
    other.register_buffer("ids", torch.arange(1, 4), persistent=False)
    assert cache.key(buffered, (x,), ["x"], ["y"], None, "a") != cache.key(other, (x,), ["x"], ["y"], None, "a")
    assert ExportCache(module_limit=1000).key(layer(), (x,), ["x"], ["y"], None, "a") is None  # too large


def test_a_graph_from_memory_is_checked_like_an_exported_one(llama_src, tmp_path, monkeypatch):
    """Were the key to miss something, the kept graph would disagree with the module and stop the compile."""
    import eec.compiler.export as export
    from eec.compiler import compile_model
    from eec.errors import CompileError

    export.EXPORTS.clear()
    compile_model(llama_src / "hf", tmp_path / "a.eec", exits=[2], calibrate=False)
    real_key = export.EXPORTS.key
    # every graph of another model's compile is looked up under this model's keys
    other = tmp_path / "other"
    model_type, overrides = TINY_SHAPES["llama-gqa-untied"]
    tiny_model(model_type, seed=1, **overrides).save_pretrained(other)
    keys = {}
    monkeypatch.setattr(export.EXPORTS, "key", lambda module, *parts: keys.setdefault(parts[-2], real_key(module, *parts)))
    compile_model(llama_src / "hf", tmp_path / "b.eec", exits=[2], calibrate=False)  # records this model's keys
    with pytest.raises(CompileError, match="disagrees with PyTorch"):
        compile_model(other, tmp_path / "c.eec", exits=[2], calibrate=False)
    assert not (tmp_path / "c.eec").exists()

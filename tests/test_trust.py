"""An artifact is untrusted input: bad artifacts, by the surface they attack, each refused with a typed
one-line error before anything in them reaches onnxruntime (docs/security.md)."""

import json
import os
import shutil

import onnx
import pytest

from eec.errors import ArtifactError
from eec.runtime import load
from eec.runtime.manifest import sha256_file


@pytest.fixture
def art(llama_compiled, tmp_path):
    """A copy of a compiled artifact inside ``tmp_path/inside``, with ``tmp_path/outside`` beside it."""
    copy = tmp_path / "inside" / "a.eec"
    shutil.copytree(llama_compiled.artifact, copy)
    (tmp_path / "outside").mkdir()
    return copy


def rewrite(path, change, rehash=()):
    raw = json.loads((path / "manifest.json").read_text())
    change(raw)
    for name in rehash:  # an attacker recomputes the hashes of what they changed
        raw["files"][name] = sha256_file(path / name)
    (path / "manifest.json").write_text(json.dumps(raw))


def first_graph(raw, value):
    raw["segments"][0]["graphs"]["plain"] = value


# -- paths in the manifest ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["../../outside/seg0.onnx", "/etc/passwd", "graphs/../../x.onnx", "./graphs/seg0.onnx",
                                  "graphs\\seg0.onnx", "C:/x.onnx", ""])
def test_a_graph_path_that_leaves_the_artifact_is_refused(art, tmp_path, path):
    shutil.copy(art / "graphs" / "seg0.onnx", tmp_path / "outside" / "seg0.onnx")
    rewrite(art, lambda raw: first_graph(raw, path))
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        load(art)


@pytest.mark.parametrize("verify", [True, False])
def test_a_named_file_must_be_listed_with_its_hash(art, verify):
    def change(raw):
        raw["segments"][0]["graphs"]["plain"] = "graphs/seg9.onnx"
    shutil.copy(art / "graphs" / "seg0.onnx", art / "graphs" / "seg9.onnx")
    rewrite(art, change)
    with pytest.raises(ArtifactError, match="named but not listed"):
        load(art, verify=verify)  # even unverified loads do not open an unhashed graph


@pytest.mark.parametrize("which", ["file", "folder"])
def test_a_file_reached_through_a_link_is_refused(art, tmp_path, which):
    if which == "file":  # the graph replaced by a link to the same bytes outside: the hash still matches
        target = tmp_path / "outside" / "weights.data"
        shutil.move(art / "graphs" / "weights.data", target)
        os.symlink(target, art / "graphs" / "weights.data")
    else:
        shutil.move(art / "graphs", tmp_path / "outside" / "graphs")
        os.symlink(tmp_path / "outside" / "graphs", art / "graphs")
    with pytest.raises(ArtifactError, match="reached through a link"):
        load(art)


def test_a_truncated_graph_with_a_recomputed_hash_is_a_one_line_error(art):
    graph = art / "graphs" / "seg1.onnx"
    graph.write_bytes(graph.read_bytes()[:200])
    rewrite(art, lambda raw: None, rehash=["graphs/seg1.onnx"])
    with pytest.raises(ArtifactError, match="onnxruntime cannot open .*seg1.onnx") as e:
        load(art)
    assert "\n" not in str(e.value)


def test_a_folder_in_place_of_a_graph(art):
    (art / "graphs" / "seg1.onnx").unlink()
    (art / "graphs" / "seg1.onnx").mkdir()
    with pytest.raises(ArtifactError, match="missing graphs/seg1.onnx"):
        load(art)


def test_external_data_outside_the_artifact_never_loads(art, tmp_path):
    graph = art / "graphs" / "seg0.onnx"
    model = onnx.load(graph, load_external_data=False)
    shutil.copy(art / "graphs" / "weights.data", tmp_path / "outside" / "weights.data")
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../outside/weights.data"
    graph.write_bytes(model.SerializeToString())
    rewrite(art, lambda raw: None, rehash=["graphs/seg0.onnx"])
    with pytest.raises(ArtifactError, match="onnxruntime cannot open .*seg0.onnx"):
        load(art)


# -- the manifest's fields ------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda r: r["model"].update(context_length=10**15), "context_length"),
    (lambda r: r["model"].update(head_dim=-16), "head_dim"),
    (lambda r: r["model"].update(num_layers="6"), "num_layers"),
    (lambda r: r["model"].update(num_kv_heads=3), "multiple"),
    (lambda r: r.update(segments=[]), "no segments"),
    (lambda r: r["segments"].pop(1), "cover layers"),
    (lambda r: r["segments"][0].update(kv_cache="mmap"), "kv_cache"),
    (lambda r: r.update(eos_token_ids=[10**9]), "eos_token_ids"),
    (lambda r: r["segments"][0]["exit"].update(shortlist=-1), "malformed exit"),
])
def test_fields_are_checked_before_anything_is_allocated(art, change, message):
    rewrite(art, change)
    with pytest.raises(ArtifactError, match=message):
        load(art)


def test_a_manifest_that_is_not_utf8_or_nested_too_deeply(art):
    (art / "manifest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ArtifactError, match="not UTF-8"):
        load(art)
    (art / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="nested too deeply|not an eec artifact"):
        load(art)

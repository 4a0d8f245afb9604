"""Manifest validation on load: schema, version, malformed JSON, unlisted files."""

import json
import shutil

import pytest

from eec.errors import ArtifactError
from eec.runtime.manifest import read_manifest


@pytest.fixture
def artifact_copy(llama_compiled, tmp_path):
    copy = tmp_path / "a.eec"
    shutil.copytree(llama_compiled.artifact, copy)
    return copy


def rewrite(path, change):
    raw = json.loads((path / "manifest.json").read_text())
    change(raw)
    (path / "manifest.json").write_text(json.dumps(raw))


def test_roundtrip(artifact_copy, llama_compiled):
    m = read_manifest(artifact_copy)
    assert m.exits == llama_compiled.exits
    assert [(s.start, s.stop) for s in m.segments] == [(0, 1), (1, 3), (3, 4), (4, 6)]


def to_version_1(raw):
    """The manifest as eec wrote it before a segment's graphs were one map by role."""
    raw["schema_version"] = 1
    for s in raw["segments"]:
        graphs = s.pop("graphs")
        s.update(file=graphs["plain"], fill=graphs.get("fill"), with_head=graphs.get("with_head"),
                 verify=graphs.get("verify"))


def test_version_1_manifests_load_by_conversion(artifact_copy, llama_compiled):
    from eec.runtime import load

    new = read_manifest(artifact_copy)
    assert any(len(s.graphs) > 1 for s in new.segments)  # graphs besides the plain one are converted too
    tokens = load(artifact_copy).generate([4, 8, 15], thresholds=0.4, max_new_tokens=12)
    rewrite(artifact_copy, to_version_1)
    assert read_manifest(artifact_copy).segments == new.segments
    again = load(artifact_copy).generate([4, 8, 15], thresholds=0.4, max_new_tokens=12)
    assert (again.tokens, again.exits) == (tokens.tokens, tokens.exits)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(schema_version=99), "schema version 99"),
    (lambda r: r["segments"][0]["graphs"].pop("plain"), "the plain one included"),
    (lambda r: r["segments"][0]["graphs"].update(draft="x.onnx"), "map roles"),
    (lambda r: r["segments"].__setitem__(0, 7), "malformed"),
    (lambda r: r.update(schema="something"), "not an eec artifact manifest"),
    (lambda r: r.pop("segments"), "malformed"),
])
def test_bad_manifest(artifact_copy, change, message):
    rewrite(artifact_copy, change)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(artifact_copy)


def test_not_json(artifact_copy):
    (artifact_copy / "manifest.json").write_text("{nope")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(artifact_copy)


def test_unlisted_and_missing_files(artifact_copy):
    (artifact_copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="does not list: extra.bin"):
        read_manifest(artifact_copy)
    (artifact_copy / "extra.bin").unlink()
    (artifact_copy / "graphs" / "shared_head.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing graphs/shared_head.onnx"):
        read_manifest(artifact_copy)

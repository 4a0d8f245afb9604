"""The artifact's manifest: schema, validation and file hashes.

The compiler writes it and the runtime reads it, so it lives on the runtime
side and needs nothing but the standard library. docs/format.md describes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath

from eec.errors import ArtifactError

SCHEMA = "eec-artifact"
# 2: a segment's graphs as one map by role (`SegmentSpec.graphs`); version 1 named them in four
# fields (file, fill, with_head, verify) and is read by converting them.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"


# A segment's graphs by role: the segment; the segment with its exit head inside (early exit runs it in
# place of the segment and the head's own graph); its KV fill (the propagating catch-up); the last
# segment with the final head's token at every position (speculative decoding and the monitor).
PLAIN, WITH_HEAD, FILL, VERIFY = "plain", "with_head", "fill", "verify"
ROLES = (PLAIN, WITH_HEAD, FILL, VERIFY)


@dataclass(frozen=True)
class ExitSpec:
    layer: int  # the exit reads the hidden state after this many layers
    kind: str  # "shared" (the model's final norm + LM head), "trained" or "final"
    file: str | None  # the head's own graph; None for the final head, which is inside the last segment's graph
    shortlist: int = 0  # vocabulary ids the head projects onto; 0: the whole vocabulary


@dataclass(frozen=True)
class SegmentSpec:
    # The segment's graphs by role (`ROLES`): "plain" always; "with_head", its exit head inside
    # (`eec.compiler.passes.FuseExitHead`), which early exit runs in place of the segment and the
    # head's own graph; "fill", the KVFill graph that writes the KV of positions that left at an
    # earlier exit from that exit's hidden state (`eec.compiler.modules.KVFill`); "verify", the
    # last segment with the token at every position (`eec.runtime.speculative`). Every graph of a
    # segment takes its inputs and reads and appends to its KV.
    graphs: dict[str, str]
    start: int  # first layer (inclusive)
    stop: int  # last layer (exclusive)
    inputs: list[str]
    outputs: list[str]
    exit: ExitSpec | None  # the head at `stop`; the last segment's is the final head, inside its graph
    # "shared": attention is onnxruntime's GroupQueryAttention, whose past and present KV may be one
    # preallocated buffer it appends to in place; "concat": present = past + new, a fresh tensor per call.
    kv_cache: str = "concat"

    @property
    def file(self) -> str:
        """The segment's plain graph."""
        return self.graphs[PLAIN]

    def graph(self, role: str) -> str | None:
        """The file of the segment's graph in ``role``; None where the artifact has none."""
        return self.graphs.get(role)

    def with_graph(self, role: str, file: str | None) -> "SegmentSpec":
        """This spec with the graph in ``role`` set to ``file`` (None: removed)."""
        graphs = {r: f for r, f in self.graphs.items() if r != role}
        if file is not None:
            graphs[role] = file
        return replace(self, graphs={r: graphs[r] for r in ROLES if r in graphs})

    @property
    def takes_ids(self) -> bool:
        return self.inputs[0] == "input_ids"

    @property
    def emits_hidden(self) -> bool:
        return "hidden_out" in self.outputs

    @property
    def scores_exit(self) -> bool:
        """The segment computes its exit classifier's score (``exit_score``, after ``hidden_out``)."""
        return "exit_score" in self.outputs


@dataclass(frozen=True)
class ModelSpec:
    family: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    source: str
    intermediate_size: int = 0  # 0 in artifacts written before eec 0.2


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


@dataclass(frozen=True)
class CalibrationSpec:
    file: str  # npz of traces: eec.calib.traces.Traces
    metric: str  # the metric thresholds apply to by default (one of eec.calib.metrics.ALL_METRICS)
    tokens: int  # traced tokens
    prompts: int  # calibration prompts


@dataclass(frozen=True)
class PartSpec:
    """One side of an edge–cloud split written by `eec split` (`eec.compiler.split`)."""

    role: str  # "device": layers 0..at, ending at the exit at ``at``; "server": layers at..num_layers
    at: int
    whole: str  # the whole artifact's fingerprint (its manifest's sha256), which both sides send and check
    exits: list[int] = field(default_factory=list)  # the whole artifact's exits, the server's included


PART_ROLES = ("device", "server")


@dataclass(frozen=True)
class Manifest:
    model: ModelSpec
    segments: list[SegmentSpec]
    precision: str
    target: str
    eos_token_ids: list[int]
    tokenizer: TokenizerSpec | None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    eec_version: str = ""
    calibration: CalibrationSpec | None = None
    placement: dict | None = None  # `eec compile --exits auto`: ε, the chosen exits, predicted speedups
    engines: dict | None = None  # `eec build-engines`: the TensorRT engine cache's folder and where it was built
    catch_up: str = "exact"  # how deeper layers get the KV of exited positions by default (eec.runtime.decode)
    part: PartSpec | None = None  # a split's device or server part; None: the whole model

    @property
    def exits(self) -> list[int]:
        """Layers of the early exits (the final head is not one); a device part's are the whole artifact's,
        since a generation leaves at the server's exits too."""
        if self.part is not None and self.part.role == "device":
            return list(self.part.exits)
        return [s.exit.layer for s in self.segments[:-1] if s.exit is not None]

    @property
    def first_layer(self) -> int:
        """The first layer the segments run: 0, or a server part's split."""
        return self.part.at if self.part is not None and self.part.role == "server" else 0

    @property
    def last_layer(self) -> int:
        """The layer the segments end at: the model's last, or a device part's split."""
        return self.part.at if self.part is not None and self.part.role == "device" else self.model.num_layers

    def to_json(self) -> str:
        body = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}
        return json.dumps(body, indent=2) + "\n"

    @staticmethod
    def from_json(text: str) -> "Manifest":
        raw = parse_json(text)
        if isinstance(raw, dict) and raw.get("schema") == "eec-classifier":
            raise ArtifactError("this is a classifier artifact; this command works on decoder artifacts (a classifier "
                                "runs with `classify`, and `eec inspect` and `eec profile --data` take it)")
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise ArtifactError("manifest.json is not an eec artifact manifest")
        version = raw.get("schema_version")
        if version not in (1, SCHEMA_VERSION):
            raise ArtifactError(
                f"artifact schema version {version} is not supported "
                f"(this eec reads versions 1 and {SCHEMA_VERSION}); recompile it"
            )
        try:
            segments = [_segment(s, version) for s in raw["segments"]]
            tok = raw.get("tokenizer")
            cal = raw.get("calibration")
            return Manifest(
                model=ModelSpec(**raw["model"]),
                segments=segments,
                precision=raw["precision"],
                target=raw["target"],
                eos_token_ids=list(raw["eos_token_ids"]),
                tokenizer=TokenizerSpec(**tok) if tok else None,
                files=dict(raw["files"]),
                eec_version=raw.get("eec_version", ""),
                calibration=CalibrationSpec(**cal) if cal else None,
                placement=raw.get("placement"),
                engines=raw.get("engines"),
                catch_up=raw.get("catch_up", "exact"),
                part=PartSpec(**raw["part"]) if raw.get("part") else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"manifest.json is malformed ({type(e).__name__}: {e})") from None


def parse_json(text: str):
    """A manifest's JSON, with a one-line error for text that is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"manifest.json is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ArtifactError("manifest.json is nested too deeply to be a manifest") from None


def _segment(raw: dict, version: int) -> SegmentSpec:
    raw = dict(raw)
    if version == 1:  # four fields, converted to the role map
        raw["graphs"] = {role: raw.pop(field) for role, field in
                         ((PLAIN, "file"), (WITH_HEAD, "with_head"), (FILL, "fill"), (VERIFY, "verify")) if raw.get(field)}
        for field_ in ("fill", "with_head", "verify"):
            raw.pop(field_, None)
    graphs = raw.get("graphs")
    if not isinstance(graphs, dict) or PLAIN not in graphs or set(graphs) - set(ROLES) \
            or not all(isinstance(f, str) for f in graphs.values()):
        raise ArtifactError(f"manifest.json: a segment's graphs must map roles ({', '.join(ROLES)}) to files, "
                            f"the plain one included; got {graphs!r}")
    raw["exit"] = ExitSpec(**raw["exit"]) if raw.get("exit") else None
    return SegmentSpec(**raw)


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write manifest.json by replacing the file, never by writing into it (it may be a hard link)."""
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, root / MANIFEST)


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished directory ``new`` to ``out``, replacing what is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(out)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, by relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(root: Path, verify: bool = True) -> Manifest:
    """Read and validate an artifact directory's manifest.

    With ``verify``, every file's sha256 must match and no file may be
    missing or unlisted: an artifact is used whole or not at all.
    """
    root = Path(root)
    manifest = Manifest.from_json(manifest_text(root))
    check_fields(manifest)
    check_paths(root, manifest)
    if verify:
        verify_files(root, manifest.files)
    return manifest


def manifest_text(root: Path) -> str:
    """The text of ``root``'s manifest.json, with a one-line error where there is none."""
    if not root.exists():
        raise ArtifactError(f"no artifact at {root}")
    if not root.is_dir() or not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root} is not an eec artifact (no {MANIFEST}); compile one with `eec compile`")
    try:
        return (root / MANIFEST).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{root / MANIFEST} is not UTF-8 text") from None


def artifact_schema(root: Path) -> str | None:
    """The ``schema`` an artifact's manifest declares (which kind of artifact it is); None where unreadable."""
    try:
        raw = json.loads(manifest_text(Path(root)))
    except (ArtifactError, json.JSONDecodeError, RecursionError):
        return None
    return raw.get("schema") if isinstance(raw, dict) and isinstance(raw.get("schema"), str) else None


def verify_files(root: Path, files: dict[str, str]) -> None:
    """Every listed file matches its sha256 and nothing unlisted lies in the artifact."""
    actual = hash_files(root)
    for name, digest in files.items():
        if name not in actual:
            raise ArtifactError(f"artifact {root} is missing {name}")
        if actual[name] != digest:
            raise ArtifactError(f"artifact {root}: {name} does not match its sha256 in the manifest (modified or corrupt)")
    extra = sorted(set(actual) - set(files))
    if extra:
        raise ArtifactError(f"artifact {root} holds files the manifest does not list: {', '.join(extra)}")


# Bounds on what a manifest may ask the runtime to allocate: far above any model eec compiles.
LIMITS = {"num_layers": 1024, "hidden_size": 65536, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096,
          "vocab_size": 1 << 22, "context_length": 1 << 20, "intermediate_size": 1 << 20}
KV_CACHES = ("shared", "concat")


def _bad(what: str) -> ArtifactError:
    return ArtifactError(f"manifest.json: {what}")


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_fields(manifest: Manifest) -> None:
    """Types and ranges of what the runtime sizes buffers and loops from, checked before any of it is used."""
    m = manifest.model
    for name, high in LIMITS.items():
        low = 0 if name == "intermediate_size" else 1
        if not _whole(getattr(m, name), low, high):
            raise _bad(f"model.{name} must be a whole number in {low}..{high}, got {getattr(m, name)!r}")
    if m.num_heads % m.num_kv_heads:
        raise _bad(f"model.num_heads ({m.num_heads}) is not a multiple of num_kv_heads ({m.num_kv_heads})")
    if not manifest.segments:
        raise _bad("no segments")
    part = manifest.part
    if part is not None and not (part.role in PART_ROLES and _whole(part.at, 1, m.num_layers - 1)
                                 and isinstance(part.whole, str) and isinstance(part.exits, list)
                                 and all(_whole(e, 1, m.num_layers - 1) for e in part.exits)):
        raise _bad(f"part must name a role ({', '.join(PART_ROLES)}), a layer and the whole artifact; got {part!r}")
    if part is not None and part.role == "device" and (manifest.segments[-1].exit is None
                                                       or manifest.segments[-1].exit.layer != part.at):
        raise _bad(f"a device part's last segment must end at its exit at layer {part.at}")
    start = manifest.first_layer
    for s in manifest.segments:
        if not (_whole(s.start, 0, m.num_layers) and _whole(s.stop, 1, m.num_layers)) or s.start != start or s.stop <= s.start:
            raise _bad(f"segments must cover layers {manifest.first_layer}..{manifest.last_layer} in order; got layers "
                       f"{s.start!r}..{s.stop!r}")
        start = s.stop
        if s.kv_cache not in KV_CACHES:
            raise _bad(f"a segment's kv_cache must be one of {', '.join(KV_CACHES)}, got {s.kv_cache!r}")
        if not (isinstance(s.inputs, list) and isinstance(s.outputs, list)
                and all(isinstance(n, str) for n in (*s.inputs, *s.outputs)) and len(s.inputs) >= 3):
            raise _bad(f"layers {s.start}-{s.stop}: inputs and outputs must be lists of names")
        if s.exit is not None and not (_whole(s.exit.layer, 1, m.num_layers) and (s.exit.file is None or isinstance(s.exit.file, str))
                                       and _whole(s.exit.shortlist, 0, m.vocab_size)):
            raise _bad(f"layers {s.start}-{s.stop}: a malformed exit {s.exit!r}")
    if start != manifest.last_layer:
        raise _bad(f"segments cover layers {manifest.first_layer}..{start}, not ..{manifest.last_layer}")
    if (manifest.segments[0].takes_ids) != (manifest.first_layer == 0):
        raise _bad("the first segment takes token ids exactly when it starts at layer 0")
    if not (isinstance(manifest.eos_token_ids, list) and all(_whole(t, 0, m.vocab_size - 1) for t in manifest.eos_token_ids)):
        raise _bad(f"eos_token_ids must be token ids below {m.vocab_size}, got {manifest.eos_token_ids!r}")
    if not (isinstance(manifest.files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in manifest.files.items())):
        raise _bad("files must map paths to sha256 digests")
    if not isinstance(manifest.precision, str) or not isinstance(manifest.target, str):
        raise _bad("precision and target must be names")
    tok = manifest.tokenizer
    if tok is not None and not (isinstance(tok.file, str) and all(v is None or isinstance(v, str) for v in
                                                                   (tok.chat_template, tok.bos_token, tok.eos_token))):
        raise _bad("tokenizer: file, chat_template, bos_token and eos_token must be text")
    cal = manifest.calibration
    if cal is not None and not (isinstance(cal.file, str) and isinstance(cal.metric, str)):
        raise _bad("calibration: file and metric must be text")


def named_files(manifest: Manifest) -> list[str]:
    """Every file the manifest points the runtime at: graphs, heads, tokenizer, calibration traces."""
    names = [f for s in manifest.segments for f in s.graphs.values()]
    names += [s.exit.file for s in manifest.segments if s.exit and s.exit.file]
    names += [x.file for x in (manifest.tokenizer, manifest.calibration) if x is not None]
    return names


def check_paths(root: Path, manifest: Manifest) -> None:
    check_tree(root, named_files(manifest), manifest.files)


def check_tree(root: Path, named: list[str], files: dict[str, str]) -> None:
    """Every path is relative, inside the artifact and listed with its sha256; no file is reached through
    a link (an artifact is untrusted input: nothing outside its folder may reach onnxruntime or the tokenizer)."""
    for name in [*named, *files]:
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or ":" in name or ".." in parts or "." in parts \
                or PurePosixPath(name).as_posix() != name:
            raise _bad(f"{name!r} is not a plain relative path inside the artifact")
    unlisted = sorted(set(named) - set(files))
    if unlisted:
        raise _bad(f"{', '.join(unlisted)} named but not listed with a sha256 in files")
    inside = root.resolve()
    for name in files:
        path = root
        for part in PurePosixPath(name).parts:
            path = path / part
            if path.is_symlink():
                raise ArtifactError(f"artifact {root}: {name} is reached through a link ({path.relative_to(root)}); "
                                    "an artifact's files must lie inside it")
        if path.exists() and not path.resolve().is_relative_to(inside):
            raise ArtifactError(f"artifact {root}: {name} lies outside the artifact")

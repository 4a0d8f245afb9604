"""A classifier artifact's manifest: schema and validation (standard library only).

A classifier artifact holds a branched network (docs/format.md) cut into
segments of stages, one per kept exit. Every graph takes ``x`` (the input, or
the previous segment's ``hidden``); an exit segment has a plain graph
returning ``hidden`` (full mode, which must not pay for heads) and a
``with_head`` graph returning ``hidden``, ``probs`` and ``label`` (early
exit); the last segment's plain graph ends in the final classifier and
returns ``probs`` and ``label``. A text classifier's graphs take the padding
mask too, and each may have an ``_unpadded`` twin without it, for calls
whose texts are all one length.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eec.errors import ArtifactError, InputError
from eec.runtime.manifest import MANIFEST, PLAIN, WITH_HEAD, _whole, check_tree, manifest_text, parse_json, verify_files

SCHEMA = "eec-classifier"
SCHEMA_VERSION = 1
ROLES = (PLAIN, WITH_HEAD)
# A text classifier's graphs for calls without padding (every text one length: one text at a time), the
# padding mask taken out (`eec.compiler.passes.drop_padding_mask`); optional, twins of the roles above.
UNPADDED = {PLAIN: "plain_unpadded", WITH_HEAD: "with_head_unpadded"}
INPUT, HIDDEN, PROBS, LABEL = "x", "hidden", "probs", "label"
IDS, MASK = "input_ids", "attention_mask"  # a text classifier's inputs
HIDDEN_IN = "hidden_in"  # a text classifier's later segments: the previous segment's hidden state
EXIT_SCORE = "exit_score"  # a learned exit's confidence that the segment's answer is right (BERxiT)
INPUT_DTYPES = ("float32", "int64")  # int64: token ids
LIMITS = {"num_classes": 1 << 20, "num_stages": 4096, "input_dim": 1 << 20, "input_rank": 8}


@dataclass(frozen=True)
class ClassifierSegment:
    graphs: dict[str, str]  # role -> file: "plain" always; "with_head" on every segment but the last
    start: int  # first stage (inclusive)
    stop: int  # last stage (exclusive); the segment's exit head follows stage stop - 1
    # The graphs' inputs: the first is the network's input (the first segment) or the previous segment's
    # hidden state; the others (a text classifier's padding mask) are the batch's, passed to every segment.
    inputs: list[str] = field(default_factory=lambda: [INPUT])

    @property
    def exit(self) -> int:
        """The stage after which this segment's head sits (a sample leaving here "left after" it)."""
        return self.stop - 1


@dataclass(frozen=True)
class TextSpec:
    """A text classifier's input: its tokenizer and how token ids are laid out."""

    tokenizer: str  # tokenizer.json in the artifact (Hugging Face tokenizers' format, special tokens included)
    max_length: int  # the longest input in tokens, special tokens included; longer texts are truncated
    pad_id: int  # the id that fills a batch's shorter rows (their mask is 0 there)


RULES = ("risk", "valade", "joint")  # threshold rules (eec.runtime.classifier.fit_cascade)
CRITERIA = ("agreement", "accuracy")  # what ε holds exits to: full mode's answers, or the labels


def check_meaning(criterion: str, rule: str) -> None:
    """Refuse an unknown criterion or threshold rule (what ε means), in a call or a compile."""
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if rule not in RULES:
        raise InputError(f"unknown threshold rule {rule!r}; choose from {', '.join(RULES)}")


@dataclass(frozen=True)
class ClassifierCalibration:
    file: str  # npz: `probs` [samples, segments, classes] (every exit's, the final last), `labels` [samples] or -1
    samples: int
    labeled: bool  # the calibration set came with labels (accuracy is reported beside agreement)
    metric: str  # the default confidence metric (eec.runtime.classifier.METRICS)
    # what ε means when `classify` is not told: the criterion and rule `--exits auto` placed the exits for
    criterion: str = "agreement"
    rule: str = "risk"


@dataclass(frozen=True)
class ClassifierManifest:
    input_shape: list[int]  # one sample's shape, without the batch
    input_dtype: str
    num_classes: int
    num_stages: int
    segments: list[ClassifierSegment]
    precision: str
    target: str
    class_names: list[str] | None = None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    eec_version: str = ""
    source: str = ""
    calibration: ClassifierCalibration | None = None
    placement: dict | None = None  # `--exits auto`: ε, the chosen exits, the measured segment latencies
    text: TextSpec | None = None  # a text classifier (input_shape [max_length], int64 token ids)
    architecture: str = ""  # a text classifier's family (bert, roberta, distilbert, electra, albert); "" for a branched network
    # Exit segments' with-head graphs also return `exit_score`, a learned exit's confidence (metric "learned")
    learned_exit: bool = False

    @property
    def exits(self) -> list[int]:
        """Stages after which an early exit sits (the final classifier is not one)."""
        return [s.exit for s in self.segments[:-1]]

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}, indent=2) + "\n"

    @staticmethod
    def from_json(text: str) -> "ClassifierManifest":
        raw = parse_json(text)
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise ArtifactError("manifest.json is not an eec classifier manifest")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"classifier artifact schema version {raw.get('schema_version')!r} is not supported "
                                f"(this eec reads version {SCHEMA_VERSION}); recompile it")
        try:
            raw.pop("schema"), raw.pop("schema_version")
            raw["segments"] = [ClassifierSegment(**s) for s in raw["segments"]]
            cal = raw.get("calibration")
            raw["calibration"] = ClassifierCalibration(**cal) if cal else None
            raw["text"] = TextSpec(**raw["text"]) if raw.get("text") else None
            return ClassifierManifest(**raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"manifest.json is malformed ({type(e).__name__}: {e})") from None


def _bad(what: str) -> ArtifactError:
    return ArtifactError(f"manifest.json: {what}")


def check_fields(m: ClassifierManifest) -> None:
    """Types and ranges of what the runtime allocates and loops over, before any of it is used."""
    if not (isinstance(m.input_shape, list) and 1 <= len(m.input_shape) <= LIMITS["input_rank"]
            and all(_whole(d, 1, LIMITS["input_dim"]) for d in m.input_shape)):
        raise _bad(f"input_shape must be 1 to {LIMITS['input_rank']} whole numbers, got {m.input_shape!r}")
    if m.input_dtype != ("int64" if m.text else "float32"):
        raise _bad(f"input_dtype must be {'int64 (token ids)' if m.text else 'float32'}, got {m.input_dtype!r}")
    t = m.text
    if t is not None and not (isinstance(t.tokenizer, str) and _whole(t.max_length, 2, LIMITS["input_dim"])
                              and m.input_shape == [t.max_length] and _whole(t.pad_id, 0, 1 << 31)):
        raise _bad("text: tokenizer must be a file, max_length a whole number equal to input_shape, pad_id an id")
    if not _whole(m.num_classes, 2, LIMITS["num_classes"]) or not _whole(m.num_stages, 1, LIMITS["num_stages"]):
        raise _bad(f"num_classes and num_stages must be whole numbers in range, got {m.num_classes!r}, {m.num_stages!r}")
    if m.class_names is not None and not (isinstance(m.class_names, list) and len(m.class_names) == m.num_classes
                                          and all(isinstance(c, str) for c in m.class_names)):
        raise _bad("class_names must be one name per class")
    if not isinstance(m.segments, list) or not m.segments:
        raise _bad("no segments")
    start = 0
    for i, s in enumerate(m.segments):
        if not (_whole(s.start, 0, m.num_stages) and _whole(s.stop, 1, m.num_stages)) or s.start != start \
                or s.stop <= s.start:
            raise _bad(f"segments must cover stages 0..{m.num_stages} in order; got {s.start!r}..{s.stop!r}")
        start = s.stop
        inputs = [IDS if i == 0 else HIDDEN_IN, MASK] if m.text else [INPUT]
        if s.inputs != inputs:
            raise _bad(f"stages {s.start}-{s.stop}: inputs must be {inputs}, got {s.inputs!r}")
        roles = {PLAIN} if i == len(m.segments) - 1 else {PLAIN, WITH_HEAD}
        twins = {UNPADDED[r] for r in roles} if m.text else set()
        if not (isinstance(s.graphs, dict) and roles <= set(s.graphs) <= roles | twins
                and all(isinstance(f, str) for f in s.graphs.values())):
            raise _bad(f"stages {s.start}-{s.stop}: graphs must map {', '.join(sorted(roles))} "
                       + (f"(and optionally {', '.join(sorted(twins))}) " if twins else "")
                       + f"to files, got {s.graphs!r}")
    if start != m.num_stages:
        raise _bad(f"segments cover stages 0..{start} of {m.num_stages}")
    if not (isinstance(m.files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.files.items())):
        raise _bad("files must map paths to sha256 digests")
    if not isinstance(m.precision, str) or not isinstance(m.target, str):
        raise _bad("precision and target must be names")
    cal = m.calibration
    if cal is not None and not (isinstance(cal.file, str) and isinstance(cal.metric, str)
                                and _whole(cal.samples, 1, 1 << 40) and isinstance(cal.labeled, bool)):
        raise _bad("calibration: file and metric must be text, samples a whole number, labeled true or false")
    if cal is not None and (cal.criterion not in CRITERIA or cal.rule not in RULES
                            or (cal.criterion == "accuracy" and not cal.labeled)):
        raise _bad(f"calibration: criterion must be one of {', '.join(CRITERIA)} (accuracy only with labels), "
                   f"rule one of {', '.join(RULES)}")


def named_files(m: ClassifierManifest) -> list[str]:
    return ([f for s in m.segments for f in s.graphs.values()] + ([m.calibration.file] if m.calibration else [])
            + ([m.text.tokenizer] if m.text else []))


def read_classifier_manifest(root: Path, verify: bool = True) -> ClassifierManifest:
    """Read and validate a classifier artifact's manifest; with ``verify``, every file's sha256 too."""
    root = Path(root)
    manifest = ClassifierManifest.from_json(manifest_text(root))
    check_fields(manifest)
    check_tree(root, named_files(manifest), manifest.files)
    if verify:
        verify_files(root, manifest.files)
    return manifest


__all__ = ["ClassifierCalibration", "ClassifierManifest", "ClassifierSegment", "MANIFEST", "read_classifier_manifest"]

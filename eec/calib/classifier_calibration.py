"""Calibration of classifier artifacts: every exit's probabilities on held-out inputs; numpy and onnxruntime.

The artifact stores the probabilities themselves (``calibration.npz``), so
thresholds for any ε, rule and metric are computed at load time
(`eec.runtime.classifier`), as the decoders' traces are. `calibrate_classifier`
re-traces an existing artifact on new held-out inputs (``eec calibrate --data``),
staged and swapped in whole like every other writer.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from eec.errors import InputError
from eec.runtime.classifier_manifest import EXIT_SCORE, HIDDEN, INPUT, PROBS

CALIBRATION = "calibration.npz"
METRIC_EPS = 0.99  # the default metric is chosen at this ε: the level a classifier is usually deployed at


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs ``x`` and optional labels ``y`` (one whole number per row of ``x``) from an .npz, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no data at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise InputError(f"{path} has no array 'x' (inputs); it holds {', '.join(z.files) or 'nothing'}")
            x, y = z["x"], (z["y"] if "y" in z.files else None)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable .npz of arrays ({str(e)[:120]})") from None
    if y is not None and (y.shape != x.shape[:1] or not np.issubdtype(y.dtype, np.integer)):
        raise InputError(f"{path}: y must hold one whole-number label per row of x")
    return x, (None if y is None else y.astype(np.int64))


TEXT_SUFFIXES = (".jsonl", ".csv")


def read_texts(path: Path, class_names: list[str] | None, num_classes: int) -> tuple[list[str], np.ndarray | None]:
    """Texts and optional labels from a JSONL file (one object a line: ``text``, optional ``label``) or a CSV
    file with a header (a ``text`` column, optional ``label``). A label is a class name (the model's own,
    e.g. ``positive``) or a class index; either all rows have one or none does."""
    import csv
    import json

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no data at {path}")
    if path.suffix not in TEXT_SUFFIXES:
        raise InputError(f"{path}: labeled text comes as {' or '.join(TEXT_SUFFIXES)}, got {path.suffix or 'no suffix'}")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix == ".csv":
                reader = csv.DictReader(f)
                if "text" not in (reader.fieldnames or []):
                    raise InputError(f"{path} has no 'text' column (its columns: {', '.join(reader.fieldnames or [])})")
                rows = list(reader)
            else:
                rows = []
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise InputError(f"{path}:{number} is not a JSON object") from None
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise InputError(f"{path}:{number} has no 'text' (each line is an object with 'text' and "
                                         "optionally 'label')")
                    rows.append(row)
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    if not rows:
        raise InputError(f"{path} holds no texts")
    texts = [str(r["text"]) for r in rows]
    raw = [r.get("label") for r in rows]
    if all(v in (None, "") for v in raw):
        return texts, None
    if any(v in (None, "") for v in raw):
        raise InputError(f"{path}: some rows have a label and others not; give every row one, or none")
    index = {name: i for i, name in enumerate(class_names or [])}
    labels = []
    for number, value in enumerate(raw, 1):
        key = str(value)
        if key in index:
            labels.append(index[key])
        elif key.lstrip("-").isdigit() and 0 <= int(key) < num_classes:
            labels.append(int(key))
        else:
            known = ", ".join(class_names) if class_names else f"0..{num_classes - 1}"
            raise InputError(f"{path}: row {number} has the unknown label {value!r}; the model's labels are {known}")
    return texts, np.array(labels, np.int64)


def read_inputs(path: Path, manifest) -> tuple:
    """What a classifier artifact classifies, from a file: texts and labels (JSONL or CSV) for a text
    classifier, else an .npz of inputs ``x`` and labels ``y``; labels checked against the classes."""
    if manifest.text is not None:
        return read_texts(path, manifest.class_names, manifest.num_classes)
    x, y = read_npz(path)
    if y is not None and y.size and (y.min() < 0 or y.max() >= manifest.num_classes):
        raise InputError(f"{path}: labels must lie in 0..{manifest.num_classes - 1}")
    return x, y


def no_progress(what: str, done: int, total: int, extra: str = "") -> None:
    pass


def trace_probs(sessions: list, num_classes: int, x: np.ndarray, progress=no_progress, batch: int = 256) -> np.ndarray:
    """Every exit's probabilities for every input row of ``x``, ``[samples, segments, classes]``: ``sessions``
    one a segment, its with-head graph (the last segment's plain graph), each taking ``x``."""
    batches = [(np.arange(i, min(i + batch, len(x))), x[i:i + batch], {}) for i in range(0, len(x), batch)]
    return trace_batches(sessions, [[INPUT]] * len(sessions), num_classes, batches, len(x), progress)


def trace_batches(sessions: list, inputs: list[list[str]], num_classes: int, batches, n: int,
                  progress=no_progress, learned: bool = False):
    """`trace_probs` over batches ``(rows, first input, {other inputs})`` (a text classifier's padded token ids
    and their mask), each segment taking ``inputs[k]``; the rows say where each batch's samples go. With
    ``learned``, also each exit's learned score (``[samples, segments]``, NaN for the final classifier):
    returns (probs, scores)."""
    probs = np.empty((n, len(sessions), num_classes), np.float32)
    scores = np.full((n, len(sessions)), np.nan, np.float32)
    done = 0
    for rows, main, side in batches:
        progress("tracing calibration inputs", done, n)
        for k, session in enumerate(sessions):
            feeds = {name: main if j == 0 else side[name] for j, name in enumerate(inputs[k])}
            if k == len(sessions) - 1:
                p, = session.run([PROBS], feeds)
            elif learned:
                main, p, scores[rows, k] = session.run([HIDDEN, PROBS, EXIT_SCORE], feeds)
            else:
                main, p = session.run([HIDDEN, PROBS], feeds)
            probs[rows, k] = p
        done += len(rows)
    return (probs, scores) if learned else probs


def simulate(probs: np.ndarray, thresholds: list[float], metric: str, learned: np.ndarray | None = None) -> dict:
    """Replay early exit on stored probabilities ``[samples, exits + 1, classes]``: the segment each sample
    leaves at, its answer, and the share of answers equal to the final classifier's."""
    from eec.runtime.classifier import replay

    scores, answers = replay(probs, metric, learned)
    n, segments = probs.shape[:2]
    leave_at = np.full(n, segments - 1)
    remaining = np.ones(n, bool)
    for k, tau in enumerate(thresholds):
        take = remaining & (scores[:, k] >= tau)
        leave_at[take] = k
        remaining &= ~take
    answer = answers[np.arange(n), leave_at]
    return {"segment": leave_at, "answer": answer, "agreement": float((answer == answers[:, -1]).mean())}


# What ε means in an artifact compiled without --criterion or --rule: accuracy where the calibration set has
# labels, else agreement ("auto"), under one threshold certified over all samples ("joint"). On the standard-
# library BERT at ε = 0.99 that ran 2.88 layers a text against 4.58 for agreement under the per-exit rule,
# with the same held-out accuracy (docs/design-notes.md). Artifacts that store neither keep agreement and risk.
DEFAULT_CRITERION = "auto"
DEFAULT_RULE = "joint"


def check_meaning(criterion: str, rule: str, data) -> None:
    """Refuse an unknown criterion or rule, or the accuracy criterion without calibration data, before building."""
    from eec.runtime.classifier_manifest import check_meaning as check_names

    check_names("agreement" if criterion == "auto" else criterion, rule)
    if criterion == "accuracy" and data is None:
        raise InputError("--criterion accuracy needs labeled calibration data: pass --data")


def resolve_criterion(criterion: str, labels, data) -> str:
    """``"auto"``: accuracy where the calibration set came with labels, else agreement."""
    if criterion == "accuracy" and labels is None:
        raise InputError(f"--criterion accuracy needs labels: {data} has none")
    if criterion == "auto":
        return "agreement" if labels is None else "accuracy"
    return criterion


def fit_thresholds(probs: np.ndarray, metric: str, eps: float, learned: np.ndarray | None = None,
                   rule: str = "risk", labels: np.ndarray | None = None) -> list[float]:
    """The thresholds (δ = 0.1) at ε by ``rule``, of accuracy against ``labels`` where given (else agreement),
    as the runtime computes them."""
    from eec.runtime.classifier import fit_cascade

    return fit_cascade(probs, metric, eps, rule, 0.1, learned, labels)


def choose_metric(probs: np.ndarray, stops: list[int], learned: np.ndarray | None = None, rule: str = "risk",
                  labels: np.ndarray | None = None) -> str:
    """The metric whose thresholds at ε = `METRIC_EPS` (by ``rule``, of accuracy where ``labels`` are given)
    leave the fewest stages run on the calibration set."""
    from eec.runtime.classifier import METRICS

    if len(stops) == 1:
        return "max-prob"
    cost = np.asarray(stops, np.float64)
    metrics = [m for m in METRICS if m != "learned" or learned is not None]
    return min(metrics, key=lambda m: float(cost[simulate(probs, fit_thresholds(probs, m, METRIC_EPS, learned, rule,
                                                                                labels), m, learned)["segment"]].mean()))


MAX_AUTO_HEADS = 12  # `--exits auto`: 4096 subsets, each replayed on the calibration set in well under a second


def check_auto_candidates(candidates: list[int]) -> None:
    """`--exits auto` tries every subset of the candidates: refuse too many before anything is built."""
    if len(candidates) > MAX_AUTO_HEADS:
        raise InputError(f"--exits auto tries every subset of the exits; this model has {len(candidates)} candidates "
                         f"(at most {MAX_AUTO_HEADS}): name the exits with --exits")


def cheapest_exit_set(probs: np.ndarray, body_s: list[float], head_s: list[float], eps: float,
                      metric: str | None = None, learned: np.ndarray | None = None, rule: str = "risk",
                      labels: np.ndarray | None = None) -> tuple[float, list[int], str]:
    """`--exits auto`: of every subset of an artifact's exits, the one with the lowest expected time a sample
    at ``eps``, with the metric that gives it (``metric`` alone where given); (expected seconds, indices of
    the exits kept, metric).

    ``probs`` ``[samples, exits + 1, classes]``: calibration probabilities at every candidate exit and
    the final classifier; ``body_s``: each segment's time without its head (the last one's whole call);
    ``head_s``: each exit head's share of its segment's call. A subset's segment is priced as the segments
    it spans, with only its own heads. Each subset is replayed with its own thresholds (by ``rule``, of accuracy
    against ``labels`` where given; patience and the ensemble depend on which exits are kept), and a sample
    costs what it ran until it left.
    """
    from eec.runtime.classifier import METRICS

    exits = probs.shape[1] - 1
    metrics = [metric] if metric else [m for m in METRICS if m != "learned" or learned is not None]
    best = None
    for size in range(exits + 1):
        for subset in itertools.combinations(range(exits), size):
            cols = [*subset, exits]
            sub, sub_learned = probs[:, cols], None if learned is None else learned[:, cols]
            # leaving at kept exit j costs every body up to its head and the kept heads up to it
            ends = [h + 1 for h in subset] + [exits + 1]
            cost = np.array([sum(body_s[:end]) + sum(head_s[h] for h in subset[:j + 1]) for j, end in enumerate(ends)])
            for m in metrics:
                leave = simulate(sub, fit_thresholds(sub, m, eps, sub_learned, rule, labels), m,
                                 sub_learned)["segment"]
                expected = float(cost[leave].mean())
                if best is None or expected < best[0]:
                    best = (expected, list(subset), m)
    return best


def place_by_times(probs: np.ndarray, with_head_s: list[float], plain_s: list[float], candidates: list[int],
                   eps: float, metric: str | None = None, learned: np.ndarray | None = None,
                   words: tuple[str, str, str] = ("stages", "sample", "the whole network"), rule: str = "risk",
                   labels: np.ndarray | None = None) -> tuple[list[int], dict]:
    """`--exits auto` from measured calls: each segment timed with its head inside (``with_head_s``, the last
    segment's whole call) and without (``plain_s``), the head priced as the difference; the cheapest subset
    of ``candidates`` (`cheapest_exit_set`) and the placement record, its report worded with ``words`` (what
    exits follow, what a sample is, what full mode runs)."""
    head_s = [max(w - p, 0.0) for w, p in zip(with_head_s, plain_s)]
    body_s = list(plain_s) + [with_head_s[-1]]
    expected, subset, chosen = cheapest_exit_set(probs, body_s, head_s, eps, metric, learned, rule, labels)
    kept = [candidates[h] for h in subset]
    full = sum(body_s)
    after, sample, whole = words
    criterion = "agreement" if labels is None else "accuracy"
    report = [f"--exits auto at ε = {eps} ({criterion}, rule {rule}): exits after {after} {kept or 'none'} "
              f"(metric {chosen}), expected "
              f"{expected * 1e6:.0f} µs a {sample} at batch 1 against {full * 1e6:.0f} µs for {whole} "
              f"({full / expected:.2f}x)"]
    return kept, {"eps": eps, "criterion": criterion, "rule": rule, "exits": kept, "metric": chosen,
                  "expected_s": expected, "full_s": full,
                  "segment_s": body_s, "head_s": head_s, "candidates": candidates, "report": report}


def write_calibration(root: Path, manifest, probs: np.ndarray, labels: np.ndarray | None, metric: str | None,
                      learned: np.ndarray | None = None, criterion: str = "agreement", rule: str = "risk"):
    """Store the probabilities (and learned exit scores) in the artifact folder ``root`` (being built, or a staged
    copy); the manifest with its calibration (``criterion`` and ``rule``: what ε means by default) and files
    updated, not yet written."""
    if criterion == "accuracy" and labels is None:
        raise InputError("criterion 'accuracy' needs labels: give every calibration row a label")
    from eec.runtime.classifier_manifest import ClassifierCalibration
    from eec.runtime.manifest import sha256_file

    extra = {} if learned is None else {"learned": learned.astype(np.float32)}
    with open(root / CALIBRATION, "wb") as f:
        np.savez(f, probs=probs, labels=labels if labels is not None else np.full(len(probs), -1, np.int64), **extra)
    metric = metric or choose_metric(probs, [s.stop for s in manifest.segments], learned, rule,
                                     labels if criterion == "accuracy" else None)
    return replace(manifest, calibration=ClassifierCalibration(CALIBRATION, len(probs), labels is not None, metric,
                                                               criterion, rule),
                   files={**manifest.files, CALIBRATION: sha256_file(root / CALIBRATION)})


def calibrate_classifier(artifact: str | os.PathLike, x, y: np.ndarray | None, metric: str | None = None,
                         progress=no_progress, criterion: str | None = None, rule: str | None = None):
    """Re-trace a classifier artifact on held-out inputs ``x`` (an array, or a text classifier's texts; labels
    ``y`` optional); returns the new manifest. ``criterion`` and ``rule`` change what ε means by default;
    not given, the artifact keeps its own."""
    from eec.runtime.classifier import METRICS, load_classifier
    from eec.runtime.manifest import PLAIN, WITH_HEAD, write_manifest
    from eec.runtime.staging import restaged

    root = Path(artifact).absolute()
    model = load_classifier(root)  # refuse a tampered artifact before building on it
    if metric is not None and metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    old = model.manifest.calibration
    check_meaning(criterion or DEFAULT_CRITERION, rule or DEFAULT_RULE, x)
    if criterion is None and old is not None and old.criterion == "accuracy" and y is None:
        raise InputError("this artifact's ε is accuracy against labels: calibrate it on rows that have a label, "
                         "or change its meaning with --criterion agreement")
    # not given: what its exits were placed for; never calibrated, what a compile with this data would choose
    criterion = resolve_criterion(criterion or (old.criterion if old else DEFAULT_CRITERION), y, "the calibration data")
    rule = rule or (old.rule if old else DEFAULT_RULE)
    if model.text is not None:
        batches, n, _ = model.text.batches(x, 32)
    else:
        x = model.check_input(x)
        batches, n = [(np.arange(i, min(i + 256, len(x))), x[i:i + 256], {}) for i in range(0, len(x), 256)], len(x)
    if y is not None:
        y = np.asarray(y)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 \
                or y.max() >= model.manifest.num_classes:
            raise InputError(f"labels must be {n} whole numbers in 0..{model.manifest.num_classes - 1}")
        y = y.astype(np.int64)
    sessions = [model.graph(i, WITH_HEAD if WITH_HEAD in seg.graphs else PLAIN)[0]
                for i, seg in enumerate(model.manifest.segments)]
    traced = trace_batches(sessions, [s.inputs for s in model.manifest.segments], model.manifest.num_classes, batches,
                           n, progress, learned=model.manifest.learned_exit)
    probs, learned = traced if model.manifest.learned_exit else (traced, None)
    with restaged(root, replaced=(CALIBRATION,)) as stage:
        manifest = write_calibration(stage, model.manifest, probs, y, metric, learned, criterion, rule)
        write_manifest(stage, manifest)
    return manifest


REPORT_LEVELS = (0.9, 0.95, 0.99)


def report(model, levels=REPORT_LEVELS, metric: str | None = None, rule: str | None = None,
           criterion: str | None = None) -> list[dict]:
    """What early exit would do on the calibration set itself at each ε (of ``criterion``): the thresholds, the
    share of samples that leave early, the mean stages run, agreement with the final classifier and, where the
    set was labeled, accuracy (its own and the final classifier's)."""
    probs, labels = model.calibration()
    metric = metric or model.manifest.calibration.metric
    stops = np.array([s.stop for s in model.manifest.segments], np.float64)
    rows = []
    for eps in levels:
        taus = model.thresholds_for(eps, metric, rule, criterion=criterion)
        sim = simulate(probs, taus, metric, model.learned_scores)
        last = len(stops) - 1
        rows.append({"epsilon": eps, "thresholds": taus, "exit_rate": float((sim["segment"] < last).mean()),
                     "mean_stages": float(stops[sim["segment"]].mean()), "agreement": sim["agreement"],
                     "accuracy": None if labels is None else float((sim["answer"] == labels).mean()),
                     "final_accuracy": None if labels is None else float((probs[:, -1].argmax(-1) == labels).mean())})
    return rows

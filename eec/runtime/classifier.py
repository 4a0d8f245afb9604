"""Classify a batch with per-sample exits: numpy and onnxruntime, no torch.

    from eec.runtime import load
    model = load("digits.eec")
    result = model.classify(images, epsilon=0.99)
    result.labels, result.probs, result.exits, result.stats

Every sample enters the first segment. After each exit segment the samples
whose confidence reaches that exit's threshold leave with the exit's answer,
and only the others go on: the batch shrinks, and no sample runs a segment
past its exit. ``thresholds`` of +inf give full mode's answers; -inf gives
every sample the first exit's.

Confidence metrics (higher = more confident), computed on the host from the
exit's class probabilities and, for the last two, from earlier exits' (kept
per sample as a running state, so no history is stored):

- ``max-prob``: the top class probability;
- ``top2-margin``: top-1 minus top-2 probability;
- ``neg-entropy``: minus the entropy of the probabilities (DeeBERT);
- ``patience``: how many consecutive exits, ending at this one, name the
  same class (PABEE: a threshold of t + 1 leaves after t unchanged answers);
- ``patience-confidence``: the lowest top probability among the last two
  exits (PCEE-BERT: leave once the exits have been confident twice in a row;
  never at the first exit);
- ``learned``: a learned exit's estimate that the exit's answer is right,
  computed in the segment (BERxiT's learning-to-exit module; artifacts
  trained with ``eec train --recipe berxit`` only);
- ``ensemble``: the top probability of the normalised geometric mean of the
  probabilities of every exit so far, which is also the answer a sample
  leaves with (Zero Time Waste's cascading ensemble, with equal weights: the
  learned weights need a second training stage, and equal weights are what
  that paper starts them at).

ε is the share of exited samples whose answer equals the final classifier's;
thresholds for it come from the calibration set's stored probabilities by the
Valade or risk-controlled rule, in cascade order (`eec.calib.thresholds`).
Where the calibration set was labeled, ``criterion="accuracy"`` holds ε to
accuracy instead (CALM's risk consistency, with a 0/1 loss): at most 1 - ε of
the exited samples may lose a right answer, that is leave with a wrong one
where the final classifier's is right. Early exit's accuracy is then at least
full mode's minus 1 - ε, and a sample the final classifier gets wrong costs
nothing by leaving early, so more samples leave than under agreement, where a
wrong exit that differs from a wrong final answer counts as a miss.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eec.calib.thresholds import cascade_thresholds, joint_threshold, risk_controlled_threshold, valade_threshold
from eec.errors import ArtifactError, InputError, InputTypeError
from eec.runtime.classifier_manifest import (
    EXIT_SCORE,
    HIDDEN,
    MASK,
    PROBS,
    ROLES,
    UNPADDED,
    ClassifierManifest,
    TextSpec,
    check_meaning,
    read_classifier_manifest,
)
from eec.runtime.manifest import PLAIN, WITH_HEAD
from eec.runtime.sessions import open_sessions
from eec.runtime.split import DEFAULT_TIMEOUT_S, RemoteClassifierTail, TailUnavailable, manifest_fingerprint

METRICS = ("max-prob", "top2-margin", "neg-entropy", "patience", "ensemble", "patience-confidence", "learned")
STATEFUL = ("patience", "ensemble", "patience-confidence")  # scores that carry state from exit to exit
PCEE_PATIENCE = 2  # patience-confidence: the exits in a row that must all be confident
MODES = ("early-exit", "full")
DEFAULT_EPSILON = 0.95
_TINY = 1e-30  # probabilities are clipped here before a log: a softmax in float32 underflows to 0


class Confidence:
    """One metric's running state over a batch as it passes exit after exit.

    `step` takes the batch's probabilities at the next exit and returns each
    sample's score and the probabilities it would leave with; `keep` drops the
    samples that left. The same object replays the calibration set, so the
    runtime and the thresholds see exactly the same scores.
    """

    def __init__(self, metric: str):
        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        self.metric = metric
        self.last: np.ndarray | None = None  # patience: each sample's previous answer
        self.run: np.ndarray | None = None  # patience: how many exits in a row gave it
        self.log_sum: np.ndarray | None = None  # ensemble: the sum of log probabilities so far
        self.seen = 0  # ensemble: exits summed
        self.recent: np.ndarray | None = None  # patience-confidence: top probabilities of the last exits, [batch, k]

    def step(self, probs: np.ndarray, learned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        p = probs.astype(np.float64, copy=False)
        if self.metric == "learned":
            return learned.astype(np.float64), probs
        if self.metric == "max-prob":
            return p.max(-1), probs
        if self.metric == "top2-margin":
            top = np.partition(p, -2, axis=-1)
            return top[:, -1] - top[:, -2], probs
        if self.metric == "neg-entropy":
            return (p * np.log(np.clip(p, _TINY, None))).sum(-1), probs
        if self.metric == "patience-confidence":
            top = p.max(-1)[:, None]
            self.recent = top if self.recent is None else np.concatenate([self.recent, top], 1)[:, -PCEE_PATIENCE:]
            if self.recent.shape[1] < PCEE_PATIENCE:
                # too few exits seen to have been confident long enough: NaN never reaches a threshold
                return np.full(len(p), np.nan), probs
            return self.recent.min(-1), probs
        if self.metric == "patience":
            label = p.argmax(-1)
            self.run = np.ones(len(p), np.int64) if self.last is None else np.where(label == self.last, self.run + 1, 1)
            self.last = label
            return self.run.astype(np.float64), probs
        # ensemble
        logs = np.log(np.clip(p, _TINY, None))
        self.log_sum = logs if self.log_sum is None else self.log_sum + logs
        self.seen += 1
        mean = self.log_sum / self.seen
        mixed = np.exp(mean - mean.max(-1, keepdims=True))
        mixed /= mixed.sum(-1, keepdims=True)
        return mixed.max(-1), mixed.astype(np.float32)

    def keep(self, rows: np.ndarray) -> None:
        for name in ("last", "run", "log_sum", "recent"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[rows])


def replay(probs: np.ndarray, metric: str, learned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and answers at every exit for stored probabilities ``[samples, exits, classes]`` (the final
    classifier last) and learned exit scores ``[samples, exits]`` where the artifact has them: what `classify`
    would compute for each sample had it gone on through every exit. The last answer is the final
    classifier's own, as `classify` gives a sample that reaches it, whatever the metric: the ensemble's
    mixture there is not what full mode answers, and ε is agreement with full mode."""
    if metric == "learned" and learned is None:
        raise InputError("this artifact has no learned exit (metric 'learned' needs exits trained with "
                         "`eec train --recipe berxit`)")
    conf = Confidence(metric)
    scores, answers = [], []
    for k in range(probs.shape[1]):
        s, p = conf.step(probs[:, k], None if learned is None else learned[:, k])
        scores.append(s)
        answers.append(p.argmax(-1))
    answers[-1] = probs[:, -1].argmax(-1)
    return np.stack(scores, 1), np.stack(answers, 1)


def fit_cascade(probs: np.ndarray, metric: str, eps: float, rule: str = "risk", delta: float = 0.1,
                learned: np.ndarray | None = None, labels: np.ndarray | None = None) -> list[float]:
    """τ for each exit at ε from stored probabilities ``[samples, exits + 1, classes]``, in cascade order: each
    exit fitted on the samples the earlier ones keep. Without ``labels`` an exit's answer counts as right when
    it equals the final classifier's (agreement); with them, unless it is wrong where the final classifier is
    right (accuracy: leaving early may lose at most 1 - ε of the exited samples' right answers). Rule "joint":
    one threshold for every exit, certified on the whole set (ε of all samples, `joint_threshold`)."""
    scores, answers = replay(probs, metric, learned)
    if labels is None:
        kept = answers[:, :-1] == answers[:, -1:]
    else:
        truth = np.asarray(labels)[:, None]
        kept = ~((answers[:, :-1] != truth) & (answers[:, -1:] == truth))

    if rule == "joint":
        return [joint_threshold(scores[:, :-1], kept, eps, delta)] * (probs.shape[1] - 1)

    def fit(c, t, e):
        c, t = c[~np.isnan(c)], t[~np.isnan(c)]  # undefined scores (NaN) never exit: left out of the fit
        return risk_controlled_threshold(c, t, e, delta) if rule == "risk" else valade_threshold(c, t, e)

    return cascade_thresholds(scores[:, :-1], kept, eps, fit)


@dataclass
class ClassifyStats:
    samples: int = 0
    seconds: float = 0.0
    exits: dict[int, int] = field(default_factory=dict)  # stage -> samples that left after it
    segment_samples: list[int] = field(default_factory=list)  # samples each segment ran on

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        exits = ", ".join(f"{k}: {v}" for k, v in self.exits.items())
        return f"{self.samples} samples, {self.samples_per_s:.1f} samples/s; left after stage {exits}"


@dataclass
class ClassifyResult:
    labels: np.ndarray  # [batch] int64
    probs: np.ndarray  # [batch, classes] float32: the probabilities each sample left with
    exits: np.ndarray  # [batch] int64: the stage each sample left after
    stats: ClassifyStats
    class_names: list[str] | None = None
    truncated: np.ndarray | None = None  # text classifiers: [batch] bool, the texts cut to the model's length
    fallback: np.ndarray | None = None  # a split: [batch] bool, the samples the device's last exit decided
    # because the server did not answer (`eec.runtime.split`)

    @property
    def names(self) -> list[str]:
        """The class names of ``labels``, where the network has them."""
        if self.class_names is None:
            raise InputError("this network was saved without class names")
        return [self.class_names[i] for i in self.labels]


class TextInput:
    """A text classifier's tokenizer, and batches of texts of similar length padded for its graphs."""

    def __init__(self, root: Path, spec: TextSpec):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(root / spec.tokenizer))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type for a bad file
            raise ArtifactError(f"{root / spec.tokenizer} is not a readable tokenizer ({str(e)[:120]})") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(spec.max_length)
        self.spec = spec

    def encode(self, texts) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of each text (special tokens added, cut at the model's length) and which were cut."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, np.ndarray) or not isinstance(texts, (list, tuple)):
            raise InputTypeError(f"a text classifier takes a text or a list of texts, got {type(texts).__name__}")
        if not texts:
            raise InputError("no texts to classify")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputTypeError(f"text {i} is {type(t).__name__}, not text")
            if not t.strip():
                raise InputError(f"text {i} is empty")
        # without character offsets, which nothing here reads: 25% less time a text (63 against 85 µs for a
        # function's source of ~70 tokens)
        encodings = self.tokenizer.encode_batch_fast(list(texts))
        return [e.ids for e in encodings], np.array([bool(e.overflowing) for e in encodings])

    def batches(self, texts, batch_size: int) -> tuple[list, int, np.ndarray]:
        """(rows, token ids, {mask}) per batch: the texts sorted by length and cut into runs of at most
        ``batch_size`` where padding them together would cost more than another call (`length_buckets`)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        ids, truncated = self.encode(texts)
        if len(ids) == 1:  # one text, as a server classifies a request: nothing to sort or pad (8 µs a text)
            tokens = np.array(ids, np.int64)
            return [(np.zeros(1, np.int64), tokens, {MASK: np.ones_like(tokens)})], 1, truncated
        order = np.argsort([len(i) for i in ids], kind="stable")
        out = []
        for start, stop in length_buckets([len(ids[r]) for r in order], batch_size):
            rows = order[start:stop]
            width = len(ids[rows[-1]])  # sorted: the last is the longest
            tokens = np.full((len(rows), width), self.spec.pad_id, np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for k, r in enumerate(rows):
                tokens[k, :len(ids[r])], mask[k, :len(ids[r])] = ids[r], 1
            out.append((rows, tokens, {MASK: mask}))
        return out, len(ids), truncated


# What one more batch costs, in padded token positions: a call's fixed costs, and the small batch's
# less efficient products. Measured on a 6-layer BERT (hidden 128, 2 cores) over 1359 held-out texts
# of 3 to 128 tokens in calls of 32: full mode 347 texts/s padded to each call's longest, 560 with no
# charge for a batch, 588-592 at 32 to 128 positions, 544 at 512 (flat between: 64 is not tuned to
# the digit). Charging attention's quadratic cost as well changed nothing measurable.
BUCKET_CALL_TOKENS = 64


def length_buckets(lengths: list[int], most: int, call_tokens: int = BUCKET_CALL_TOKENS) -> list[tuple[int, int]]:
    """Cut texts sorted by length (``lengths`` ascending) into runs [start, stop) of at most ``most``
    texts, each padded to its longest, so that the padded positions plus ``call_tokens`` per run are
    fewest: exact, by dynamic programming over where each run starts."""
    n = len(lengths)
    if n == 1:  # one text (batch 1's every call): nothing to cut, and the programme costs 5 µs a call
        return [(0, 1)]
    best = np.zeros(n + 1)  # best[j]: the cheapest cost of the first j texts
    start = np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):
        first = max(0, j - most)
        # a run ending at text j pads to lengths[j - 1]: (j - i) texts of that width, for each start i
        cost = best[first:j] + call_tokens + (j - np.arange(first, j)) * lengths[j - 1]
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], first + k
    runs, j = [], n
    while j > 0:
        runs.append((int(start[j]), j))
        j = int(start[j])
    return runs[::-1]


class EarlyExitClassifier:
    def __init__(self, root: Path, manifest: ClassifierManifest, threads: int | None = None, device: str = "cpu",
                 split: int | None = None, server: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        """``split``, ``server``: run the segments up to the exit after stage ``split`` here and send the
        samples that do not leave there to the eec server at URL ``server`` (`eec.runtime.split`)."""
        if device not in ("cpu", "cuda", "auto"):
            raise InputError(f"a classifier artifact runs on device cpu or cuda, got {device!r}")
        self.root, self.manifest = root, manifest
        self.device = "cpu" if device == "auto" else device
        # A split runs segments [0, local) here; `tail` sends the rest to the server.
        self.local = len(manifest.segments) if split is None else self.split_index(split)
        self.tail = None if split is None else RemoteClassifierTail(server, manifest_fingerprint(root), timeout)
        self.threads = threads
        # the roles of each segment that have a twin without the padding mask
        self.twins = [{role for role, twin in UNPADDED.items() if twin in seg.graphs}
                      for seg in manifest.segments[: self.local]]
        # A segment with twins without the padding mask (text classifiers) runs one set or the other by the
        # call's padding, so each set is opened at its first call: a server that classifies one text a call
        # holds only the twins' sessions, one that batches texts of mixed lengths mostly the masked ones
        # (each session prepacks its weights). Without twins every call runs the same graphs: opened now.
        self.sessions: list[dict] = [{} for _ in manifest.segments[: self.local]]
        for i, seg in enumerate(manifest.segments[: self.local]):
            if not self.twins[i]:
                for role in seg.graphs:
                    if role in ROLES:
                        self._session(i, role)
        self.text = TextInput(root, manifest.text) if manifest.text else None
        self._probs: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._learned: np.ndarray | None = None  # calibration: learned exit scores [samples, segments]
        self._thresholds: dict[tuple, list[float]] = {}

    @property
    def exits(self) -> list[int]:
        return self.manifest.exits

    def split_index(self, stage: int) -> int:
        """The segments a device runs for a split after the exit at ``stage``."""
        if not isinstance(stage, int) or isinstance(stage, bool) or stage not in self.exits:
            raise InputError(f"the split must be at an exit; this network's exits follow stages {self.exits}")
        return next(k + 1 for k, seg in enumerate(self.manifest.segments) if seg.exit == stage)

    @property
    def num_stages(self) -> int:
        return self.manifest.num_stages

    # --- calibration ------------------------------------------------------------------------------------

    def calibration(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The calibration set's stored probabilities ``[samples, exits + 1, classes]`` and labels (or None)."""
        cal = self.manifest.calibration
        if cal is None:
            raise InputError("this artifact is not calibrated: give thresholds, or compile with --data calib.npz")
        if self._probs is None:
            try:
                with np.load(self.root / cal.file, allow_pickle=False) as z:
                    probs, labels = z["probs"], z["labels"]
                    learned = z["learned"] if "learned" in z.files else None
            except (OSError, KeyError, ValueError) as e:
                raise ArtifactError(f"{self.root / cal.file} is not a readable calibration file ({e})") from None
            want = (cal.samples, len(self.manifest.segments), self.manifest.num_classes)
            if probs.shape != want or probs.dtype != np.float32 or labels.shape != (cal.samples,) \
                    or labels.dtype != np.int64:
                raise ArtifactError(f"{self.root / cal.file}: probs {probs.shape} {probs.dtype} and labels "
                                    f"{labels.shape} {labels.dtype} do not fit the manifest ({want})")
            if learned is not None and (learned.shape != want[:2] or learned.dtype != np.float32):
                raise ArtifactError(f"{self.root / cal.file}: learned scores {learned.shape} do not fit {want[:2]}")
            self._probs, self._labels, self._learned = probs, (labels if cal.labeled else None), learned
        return self._probs, self._labels

    @property
    def learned_scores(self) -> np.ndarray | None:
        """The calibration set's learned exit scores ``[samples, exits + 1]``, where the artifact has a learned exit."""
        self.calibration()
        return self._learned

    def thresholds_for(self, epsilon: float, metric: str | None = None, rule: str | None = None,
                       delta: float = 0.1, criterion: str | None = None) -> list[float]:
        """τ for each exit at level ε, in cascade order: ε of agreement with the final classifier, or with
        ``criterion="accuracy"`` of accuracy against the calibration labels (see the module's docstring); the
        metric, rule and criterion not given are the artifact's (what its exits were placed for)."""
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 <= epsilon <= 1.0:
            raise InputError(f"epsilon must be a number in [0, 1], got {epsilon!r}")
        probs, labels = self.calibration()  # refuses an uncalibrated artifact
        cal = self.manifest.calibration
        rule, criterion = rule or cal.rule, criterion or cal.criterion
        check_meaning(criterion, rule)
        if criterion == "accuracy" and labels is None:
            raise InputError("criterion 'accuracy' needs a labeled calibration set; this artifact was calibrated "
                             "without labels (calibrate it on a file whose rows have a label)")
        metric = metric or cal.metric
        key = (float(epsilon), metric, rule, delta, criterion)
        if key not in self._thresholds:
            self._thresholds[key] = fit_cascade(probs, metric, float(epsilon), rule, delta, self._learned,
                                                labels if criterion == "accuracy" else None)
        return self._thresholds[key]

    def _resolve(self, thresholds, epsilon, metric, rule, delta, criterion=None) -> tuple[list[float], str]:
        if thresholds is not None and epsilon is not None:
            raise InputError("give thresholds or epsilon, not both")
        if thresholds is not None and criterion is not None:
            raise InputError("criterion says what epsilon holds exits to; thresholds given by hand have none")
        cal = self.manifest.calibration
        metric = metric or (cal.metric if cal else "max-prob")
        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        if metric == "learned" and not self.manifest.learned_exit:
            raise InputError("this artifact has no learned exit (metric 'learned' needs exits trained with "
                             "`eec train --recipe berxit`)")
        if not self.exits and epsilon is None:
            return [], metric  # nothing to decide: early exit is full mode
        if thresholds is None:
            return self.thresholds_for(DEFAULT_EPSILON if epsilon is None else epsilon, metric, rule, delta,
                                       criterion), metric
        if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
            thresholds = [thresholds] * len(self.exits)  # one threshold for every exit
        if isinstance(thresholds, dict):
            unknown = sorted(set(thresholds) - set(self.exits), key=str)
            if unknown:
                raise InputError(f"thresholds name stages {unknown} that have no exit; exits follow stages {self.exits}")
            thresholds = [thresholds.get(k, math.inf) for k in self.exits]
        if isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__len__"):
            raise InputTypeError(f"thresholds must be a number, one per exit, or a dict by stage; got {thresholds!r}")
        if len(thresholds) != len(self.exits):
            raise InputError(f"{len(thresholds)} thresholds for {len(self.exits)} exits (after stages {self.exits})")
        try:
            values = [float(t) for t in thresholds]
        except (TypeError, ValueError):
            raise InputTypeError(f"thresholds must be numbers, got {thresholds!r}") from None
        if any(math.isnan(t) for t in values):
            raise InputError("a threshold is NaN")
        return values, metric

    # --- running ----------------------------------------------------------------------------------------

    def check_input(self, x) -> np.ndarray:
        m = self.manifest
        if not isinstance(x, np.ndarray):
            raise InputTypeError(f"classify takes a numpy array [batch, {', '.join(map(str, m.input_shape))}], "
                                 f"got {type(x).__name__}")
        if x.dtype != np.dtype(m.input_dtype):
            raise InputTypeError(f"inputs must be {m.input_dtype}, got {x.dtype} (convert with x.astype(np.{m.input_dtype}))")
        if list(x.shape[1:]) != m.input_shape:
            hint = " (one sample? add the batch axis: x[None])" if list(x.shape) == m.input_shape else ""
            raise InputError(f"inputs must have shape [batch, {', '.join(map(str, m.input_shape))}], got "
                             f"{list(x.shape)}{hint}")
        if x.shape[0] == 0:
            raise InputError("the batch is empty")
        if not np.isfinite(x).all():
            raise InputError("inputs hold NaN or infinite values")
        return np.ascontiguousarray(x)

    def classify(self, x, *, epsilon: float | None = None, thresholds=None, metric: str | None = None,
                 mode: str = "early-exit", rule: str | None = None, delta: float = 0.1,
                 criterion: str | None = None, batch_size: int = 32) -> ClassifyResult:
        """Labels, probabilities and exits for a batch ``x``: an array ``[batch, *input_shape]``, or for a text
        classifier a list of texts (or one text).

        ``mode="full"`` runs every sample to the final classifier. In early exit the thresholds are
        ``thresholds`` (one number for every exit, one per exit, or a dict by stage) or the calibrated ones for
        ``epsilon`` (default 0.95). ``criterion``: what ε holds exits to, agreement with the final classifier
        or, on a labeled calibration set, "accuracy" (at most 1 - ε of the exited samples leave with a wrong
        answer where the final classifier's is right). ``rule``: "risk" (each exit's takers, holding with
        probability 1 - ``delta``), "valade" (a point estimate), or "joint" (one threshold for every exit, ε
        over all samples, with probability 1 - ``delta``). Not given, both are the artifact's: those its
        exits were placed for (`eec compile --criterion --rule`), else agreement and risk.
        Texts run in batches of up to ``batch_size`` texts of similar length: the list is sorted by length
        and cut where padding would cost more than another call, so a list of mixed lengths runs as a few
        batches that pad little; the results are in the order given.
        """
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if self.text is not None:
            batches, n, truncated = self.text.batches(x, batch_size)
        else:
            x = self.check_input(x)
            batches, n, truncated = [(None, x, {})], x.shape[0], None
        taus, metric = ([], None) if mode == "full" else self._resolve(thresholds, epsilon, metric, rule, delta,
                                                                       criterion)
        if self.tail is not None and metric in STATEFUL:
            raise InputError(f"metric {metric!r} carries state from exit to exit; a split classifier decides with "
                             f"{', '.join(m for m in METRICS if m not in STATEFUL)}")
        start = time.perf_counter()
        result = ClassifyResult(np.empty(n, np.int64), np.empty((n, self.manifest.num_classes), np.float32),
                                np.empty(n, np.int64), ClassifyStats(samples=n), self.manifest.class_names, truncated)
        if self.tail is not None:
            result.fallback = np.zeros(n, bool)
        for rows, main, side in batches:
            self._run(main, side, rows, taus, metric, result)
        result.stats.seconds = time.perf_counter() - start
        return result

    def graph(self, i: int, role: str, unpadded: bool = False) -> tuple:
        """Segment ``i``'s session for ``role`` and the inputs it takes; for a call without padding
        (``unpadded``), the twin without the mask where the artifact has one, opened at its first use."""
        inputs = self.manifest.segments[i].inputs
        if unpadded and role in self.twins[i]:
            return self._session(i, UNPADDED[role]), inputs[:1]
        return self._session(i, role), inputs

    def _session(self, i: int, role: str):
        """Segment ``i``'s session for ``role``, opened at its first use (two threads may both open it; one
        is kept)."""
        session = self.sessions[i].get(role)
        if session is None:
            file = self.manifest.segments[i].graphs[role]
            session = self.sessions[i].setdefault(role, open_sessions(self.root, [file], self.threads,
                                                                      device=self.device)[0])
        return session

    def batch_one_graphs(self, heads: bool = True) -> tuple[list, list[list[str]]]:
        """The sessions a call of one sample runs and their inputs: with ``heads`` every segment's (its exit
        inside, the last one's classifier), else every segment's but the last one's, without heads. What
        placement and profiles time at batch 1."""
        n = len(self.manifest.segments)
        roles = [WITH_HEAD if heads and i < n - 1 else PLAIN for i in range(n if heads else n - 1)]
        picked = [self.graph(i, role, unpadded=self.text is not None) for i, role in enumerate(roles)]
        return [session for session, _ in picked], [names for _, names in picked]

    def _run(self, main: np.ndarray, side: dict[str, np.ndarray], base: np.ndarray | None, taus: list[float],
             metric: str | None, out: ClassifyResult, first: int = 0) -> None:
        """One batch through the segments, its samples leaving at their exits; written into ``out`` at the rows
        ``base`` (None: all of them). ``main`` is the first segment's first input, then each segment's hidden
        state; ``side`` the other inputs every segment takes (a padding mask), gathered with the samples.
        ``first``: the segment ``main`` enters (a split's server starts after the device's); a split's device
        sends the samples that stay after its last segment to the server."""
        stats = out.stats
        n = main.shape[0]
        rows = None  # which of the batch's samples are still in it; None: all of them (no gathering to do)
        conf = Confidence(metric) if metric else None
        last = len(self.manifest.segments) - 1
        unpadded = MASK in side and bool(side[MASK].all())
        for i in range(first, self.local):
            seg = self.manifest.segments[i]
            stats.segment_samples.append(n if rows is None else len(rows))
            handing_over = self.tail is not None and i == self.local - 1
            plain = i == last or ((conf is None or (taus[i] == math.inf and conf.metric not in STATEFUL))
                                  and not handing_over)
            # plain: the final classifier; or full mode, or an exit nobody may leave at whose scores no later
            # exit reads: the head is waste
            graph, names = self.graph(i, PLAIN if plain else WITH_HEAD, unpadded)
            feeds = {name: main if k == 0 else side[name] for k, name in enumerate(names)}
            if i == last:
                p, = graph.run([PROBS], feeds)
                leave = None
            elif plain:
                main, = graph.run([HIDDEN], feeds)
                if conf is not None:
                    stats.exits[seg.exit] = stats.exits.get(seg.exit, 0)
                continue
            else:
                if conf is not None and conf.metric == "learned":
                    main, p, learned = graph.run([HIDDEN, PROBS, EXIT_SCORE], feeds)
                else:
                    (main, p), learned = graph.run([HIDDEN, PROBS], feeds), None
                if conf is None:  # full mode: the head ran only in case the server does not answer
                    leave = np.zeros(len(p), bool)
                else:
                    score, p = conf.step(p, learned)
                    leave = score >= taus[i]
                if not leave.any() and not handing_over:
                    stats.exits[seg.exit] = stats.exits.get(seg.exit, 0)
                    continue
            if leave is None or leave.all():  # everyone left: the rest of the batch, whole
                at = slice(None) if rows is None else rows
                at = at if base is None else base[at]
                out.probs[at], out.labels[at], out.exits[at] = p, p.argmax(-1), seg.exit
                stats.exits[seg.exit] = stats.exits.get(seg.exit, 0) + len(p)
                break
            gone = np.flatnonzero(leave) if rows is None else rows[leave]
            gone = gone if base is None else base[gone]
            out.probs[gone] = p[leave]
            out.labels[gone] = out.probs[gone].argmax(-1)
            out.exits[gone] = seg.exit
            stats.exits[seg.exit] = stats.exits.get(seg.exit, 0) + len(gone)
            stay = ~leave
            rows = np.flatnonzero(stay) if rows is None else rows[stay]
            main = main[stay]
            side = {name: value[stay] for name, value in side.items()}
            if MASK in side:  # the longest text left may be shorter: drop the padding no sample needs now
                width = int(side[MASK].sum(1).max())
                if width < side[MASK].shape[1]:
                    side[MASK], main = side[MASK][:, :width], main[:, :width]
                unpadded = bool(side[MASK].all())
            main = np.ascontiguousarray(main)
            if conf is not None:
                conf.keep(stay)
            if handing_over:
                self._remote(main, side, rows if base is None else base[rows], p[stay], taus, metric, seg.exit, out)

    def _remote(self, hidden: np.ndarray, side: dict[str, np.ndarray], at: np.ndarray, own: np.ndarray,
                taus: list[float], metric: str | None, stage: int, out: ClassifyResult) -> None:
        """The samples that stayed after the device's last segment: the server's answers, or where it does
        not answer, the device's last exit's (``own``), flagged."""
        try:
            probs, exits = self.tail.run(hidden, side, None if metric is None else taus[self.local:], metric)
        except TailUnavailable:
            probs, exits = own, np.full(len(own), stage)
            out.fallback[at] = True
        out.probs[at], out.labels[at], out.exits[at] = probs, probs.argmax(-1), exits
        for e in np.unique(exits).tolist():
            out.stats.exits[e] = out.stats.exits.get(e, 0) + int(np.sum(exits == e))

    def run_tail(self, first: int, hidden: np.ndarray, side: dict[str, np.ndarray], taus: list[float] | None,
                 metric: str | None) -> tuple[np.ndarray, np.ndarray]:
        """A split's server: samples that stayed on a device through segment ``first - 1`` run on from
        segment ``first`` with the thresholds of the later exits; their probabilities and exits."""
        n = hidden.shape[0]
        out = ClassifyResult(np.empty(n, np.int64), np.empty((n, self.manifest.num_classes), np.float32),
                             np.empty(n, np.int64), ClassifyStats(samples=n))
        full = None if taus is None else [math.inf] * first + list(taus)
        self._run(hidden, side, None, full or [], metric if taus is not None else None, out, first)
        return out.probs, out.exits


def load_classifier(path: str | os.PathLike, *, threads: int | None = None, verify: bool = True,
                    device: str = "cpu", split: int | None = None, server: str | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> EarlyExitClassifier:
    root = Path(path)
    if (split is None) != (server is None):
        raise InputError("a split needs both the exit's stage (split) and the server's URL (server)")
    return EarlyExitClassifier(root, read_classifier_manifest(root, verify=verify), threads, device, split, server,
                               timeout)
